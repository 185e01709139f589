"""``xenmig demo``: the device demo, the whole-VM scenario and the test guest."""
