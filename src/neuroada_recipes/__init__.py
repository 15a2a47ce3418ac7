"""Training and evaluation recipes and the ``neuroada`` command line, built on the ``neuroada`` library, PEFT,
transformers' Trainer and datasets. Nothing in the library depends on this package."""
