"""The guest side: what runs where the swapping processes live.

``swapfs-driver`` (:mod:`.driver`) finds the unused bytes in the code pages
of its host or virtual machine (:mod:`.codescan`, reading ELF program
headers with :mod:`.elf`) and reports them to the daemon, which pools them
into the transient cache. The storage engine never imports this package:
the pool takes any region with a physical key and a length
(``swapfs.transient.Region``).
"""
