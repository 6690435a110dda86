"""vpdetect: find and identify macromolecules in cryo-electron tomograms.

An implementation of VP-Detector: a 3D mixed-scale dense network (MSDNet)
localizes particles by binary segmentation and mean-shift clustering, a
second MSDNet classifies each particle by segmenting a subtomogram around it
and voting inside the central particle's mask.
"""

__version__ = "0.1.0"
