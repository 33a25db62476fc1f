"""The flavours of image (llama.cpp, vLLM) and the lock file over all of them."""
