"""`python -m vtcbench ...` and `accelerate launch -m vtcbench run ...`."""

from vtcbench.cli import main

main()
