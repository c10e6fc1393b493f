"""The vtcshapes lmms-eval task shipped with vtcbench (YAML + hooks; data from `vtcbench.shapes`)."""
