"""Live takeover: a new daemon serves on the connection a dead one left.

The pieces, each a module of its own (docs/takeover.md):

* :mod:`mountd.takeover.fusedev`: the kernel's side, ``/dev/fuse`` opened
  and mounted by the daemon itself, the INIT request and the resend;
* :mod:`mountd.takeover.memo`: what the kernel does not keep for a new
  daemon (the INIT request, the open files), in a memfd;
* :mod:`mountd.takeover.handover`: both descriptors handed to a keeper
  that outlives the daemon (systemd's file descriptor store or a standby),
  and back;
* :mod:`mountd.takeover.standby`: ``swapfs standby``, the keeper that
  starts the next daemon itself.

The package imports nothing from its modules: the daemon takes the three
it uses, and ``python -m mountd.takeover.standby`` runs the standby (which
imports the engine's and the command line's faces, for the lease and for
spawning, and so carries them in its memory: about 1 MiB more than when it
imported those two modules alone).
"""
