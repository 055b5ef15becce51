"""Images and dense prediction: ``dense`` (task kinds, losses, split-level metrics), ``nets`` (input stage,
encoders, heads, FLOPs), ``arch`` (the image arch base). Import the submodules directly."""
