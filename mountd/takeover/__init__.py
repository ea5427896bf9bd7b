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

The package imports nothing from its modules, so that each of them (and
``python -m mountd.takeover.standby``) loads only what it uses.
"""
