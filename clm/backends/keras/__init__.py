"""Keras 3 backend: KerasHub causal LMs on TensorFlow or JAX (--keras_backend), reading and writing Hugging Face
checkpoints. Imported only when chosen (``clm.backends``)."""
