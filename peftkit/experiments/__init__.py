"""`peftkit compare` and `peftkit sweep`: methods (or one method's settings) trained side by side
on one task and budget, measured, tabulated and plotted. `runs` runs one configuration in child
processes, `options` turns the shared flags into a setup, `experiment` runs the list and `report`
writes the outputs."""
