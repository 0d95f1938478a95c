"""TensorFlow backend (Keras compile/fit). Imported only when chosen: ``clm.get_backend("tf")``."""
