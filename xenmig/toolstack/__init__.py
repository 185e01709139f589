"""What toolstacks call: domain control (xl, QMP), xend hooks, the local socket."""
