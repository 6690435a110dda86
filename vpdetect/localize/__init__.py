"""Stage 1 of VP-Detector: from a tomogram to particle coordinates.

- `tiling`: tiled MSDNet inference with valid-region stitching into one map.
- `cluster`: threshold, opening, connected components, CC-seeded mean-shift.
- `pipeline`: both on one tomogram (`localize_volume`, or its halves `segment_volume` and
  `particles_from_map`, which `vpdetect localize` and `vpdetect pick` use).
"""
