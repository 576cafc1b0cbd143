"""cnnkit: convolutional neural networks for image classification.

`cnnkit.ops` holds exact NumPy convolution and pooling primitives; `cnnkit.ConvNN` is the chapter's
CNN as a scikit-learn style estimator (imported lazily, so `import cnnkit.ops` never loads torch).
"""

__version__ = "0.1.0"

__all__ = ["ConvNN", "__version__"]


def __getattr__(name):
    if name == "ConvNN":
        from cnnkit.estimator import ConvNN

        return ConvNN
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")
