"""Pictures of CNNs: `figures` (a trained network's matplotlib figures), `grids` (Pillow grids of small
images), `explain` (the primitives step by step), `style` (sizes, colours, saving) and `report` (the
`cnnkit report` folder). `cnnkit.plots` is their public face."""
