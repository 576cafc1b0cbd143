"""Pictures: one function per figure, each returning a matplotlib Figure, for notebooks and `cnnkit report`.

Of a trained network:

    history(record.history)                       learning curves: losses, validation accuracy, learning rate
    confusion_matrix(confusion, class_names)      counts, and shares of each true class
    per_class_accuracy(confusion, class_names)    one bar per class
    mistakes(images, labels, probabilities, class_names)   the most confident wrong answers
    filters(layer_outputs.filters(model)["conv1"])      the first layer's kernels
    feature_maps(layer_outputs.activations(model, x), 0, class_names)   what every layer makes of image 0
    projection(features, labels, class_names)     the last hidden layer in 2-D (PCA)
    network(record.architecture)                  the layers, their shapes and parameters

Of the chapter's primitives, drawn step by step from what `cnnkit.ops` computes:

    explain_conv1d(x, w, padding, stride), explain_conv2d(x, w, padding, stride), explain_pool(x, size, stride, padding)

Every figure draws with one palette, cnnkit.viz.style's (the web page's colours.js mirrors it; see
docs/pictures.md): black 0, magma for values >= 0, a blue ramp of the same lightness below 0, one scale
per layer; the same line colour for the same quantity.

The functions live in cnnkit.viz (figures, grids, explain, style, and the report); this module is
their one public name. matplotlib is imported inside the functions that draw (Figure objects, Agg, no pyplot), so importing
this module costs nothing. Grids of small images (mistakes, filters, feature maps) are drawn with Pillow,
about 100 times faster than one matplotlib axes per image: `*_image` returns the PIL image (what the
report saves), and the Figure shows it at its own pixel size.
"""

from cnnkit.viz.explain import (
    CHAPTER_W1,
    CHAPTER_W2,
    CHAPTER_X1,
    CHAPTER_X2,
    POOL_EXAMPLE,
    Steps,
    conv1d_steps,
    conv2d_steps,
    explain_conv1d,
    explain_conv2d,
    explain_pool,
    pool_steps,
)
from cnnkit.viz.figures import (
    confusion_matrix,
    feature_maps,
    filters,
    history,
    mistakes,
    network,
    pca_2d,
    per_class_accuracy,
    projection,
)
from cnnkit.viz.grids import (
    MAP_LAYERS,
    feature_maps_image,
    filters_image,
    mistakes_image,
    most_confident_mistakes,
    runner_up,
)
from cnnkit.viz.style import (
    DPI,
    GRID_WIDTH,
    NAME_CHARS,
    SIZES,
    save_figure,
    save_image,
)

__all__ = [
    "CHAPTER_W1",
    "CHAPTER_W2",
    "CHAPTER_X1",
    "CHAPTER_X2",
    "DPI",
    "GRID_WIDTH",
    "MAP_LAYERS",
    "NAME_CHARS",
    "POOL_EXAMPLE",
    "SIZES",
    "Steps",
    "confusion_matrix",
    "conv1d_steps",
    "conv2d_steps",
    "explain_conv1d",
    "explain_conv2d",
    "explain_pool",
    "feature_maps",
    "feature_maps_image",
    "filters",
    "filters_image",
    "history",
    "mistakes",
    "mistakes_image",
    "most_confident_mistakes",
    "network",
    "pca_2d",
    "per_class_accuracy",
    "pool_steps",
    "projection",
    "runner_up",
    "save_figure",
    "save_image",
]
