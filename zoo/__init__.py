"""Scripts that train and export the bundled ShapesWorld model zoo (see zoo/train.py)."""
