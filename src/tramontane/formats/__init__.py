"""The checkpoint formats read without torch: the GGUF container (`gguf_file`), model hyper-parameters
from GGUF metadata (`gguf_args`), and the key tables and checks shared by the Hugging Face and GGUF
layouts (`layout`). `tramontane.jax` uses them where torch is not installed."""
