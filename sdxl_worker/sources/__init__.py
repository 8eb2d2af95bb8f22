"""2. Resolve, fetching: where a LoRA (or an ``image_url``) comes from: an http(s) URL, a Hugging Face repo, Civitai."""
