"""Networks and losses: the 3D MSDNet, the weighted focal loss, model files."""
