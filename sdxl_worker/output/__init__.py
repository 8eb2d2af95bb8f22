"""7. Encode: images -> data URIs, or uploads through the runpod SDK."""
