"""Images from a model: class (regularization) images and samples with their grids."""
