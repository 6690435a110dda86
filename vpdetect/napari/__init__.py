"""vpdetect in napari (`pip install 'vpdetect[napari]'`): tables as points layers, picking
and filtering widgets. The npe2 manifest `napari.yaml` names what napari loads from here;
nothing in this package is imported by vpdetect itself."""
