"""The allocator tuning that entry points apply keeps large buffers off fresh mmaps."""

import subprocess
import sys

# The sender's pattern: a 1 MiB chunk read in a thread, framed into a record,
# cut into TLS-sized pieces and joined again by the transport.
SCRIPT = """
import os, queue, resource, sys, threading
from xenmig.tuning import tuneAllocator
if sys.argv[1] == "tuned":
    assert tuneAllocator()
chunk = os.urandom(1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
q = queue.Queue(maxsize=2)
def reader():
    for i in range(200):
        q.put(bytes(chunk))
    q.put(None)
t = threading.Thread(target=reader)
t.start()
while (b := q.get()) is not None:
    record = b"".join([b"h" * 24, b, bytes(8)])
    pieces = [record[i:i + 16384] for i in range(0, len(record), 16384)]
    out = b"".join(pieces)
    del record, pieces, out, b
t.join()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_fewerPageFaults():
    """With the tuning, the sending pattern costs a tenth of the page faults or less."""
    plain, tuned = faults("plain"), faults("tuned")
    assert plain > 200 * 100  # hundreds of faults per MiB without the tuning
    assert tuned * 10 < plain


FREEZE = """
import gc
from xenmig.tuning import tuneAllocator
class Marker:
    pass
imported = Marker()
imported.me = imported  # in a cycle: only a collection could free it
tuneAllocator()
later = Marker()
print(gc.get_freeze_count() > 0, any(o is imported for o in gc.get_objects()),
      any(o is later for o in gc.get_objects()))
"""


def test_importedObjectsLeaveTheCollectorsSight():
    """What was alive at the tuning is no longer walked; what comes later still is."""
    out = subprocess.run(
        [sys.executable, "-c", FREEZE], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "False", "True"]
