"""What toolstacks call: domain control (xl, QMP, libvirt), xend, the local socket."""
