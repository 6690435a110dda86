"""Stage 1 of VP-Detector: from a tomogram to particle coordinates.

- `tiling`: tiled MSDNet inference with valid-region stitching into one map.
- `cluster`: threshold, opening, connected components, CC-seeded mean-shift.
- `verify`: a localizer's pick verifier scores each pick from a box of its input and its map.
- `pipeline`: all of it on one tomogram (`localize_volume`, or its halves `segment_volume` and
  `particles_from_map`, which `vpdetect localize` and `vpdetect pick` use).
"""
