"""vpdetect: find and identify macromolecules in cryo-electron tomograms.

An implementation of VP-Detector: a 3D mixed-scale dense network (MSDNet)
localizes particles by binary segmentation and mean-shift clustering, a
second MSDNet classifies each particle by segmenting a subtomogram around it
and voting inside the central particle's mask.
"""

import os

__version__ = "0.1.0"

# The CPU engine's buffers hold gigabytes of feature maps: in 2 MB pages (transparent huge
# pages, madvised by torch's allocator for allocations of 2 MB and more) they fault in with
# 512 times fewer page faults and fewer TLB misses (the paper-sized localizer on 256^3: 7 %
# faster, README "Performance"). torch reads the variable once, at its first allocation, so
# it is set here, before vpdetect imports torch; a value the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
