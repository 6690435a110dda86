"""Training MSDNets: crops from annotated tomograms (`data`) and the loop, single process or DDP (`loop`)."""
