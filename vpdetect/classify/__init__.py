"""Stage 2 of VP-Detector: a class for each particle coordinate.

`extract` cuts normalised boxes centred on the coordinates, `vote` keeps the
central particle's connected component of a box's label map and takes its
majority class, `pipeline` runs both around the classifier MSDNet for one
tomogram.
"""
