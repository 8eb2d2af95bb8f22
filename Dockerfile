# SDXL + per-request LoRA worker for RunPod serverless.
# CUDA PyTorch comes from the base image; everything else is pinned in requirements.txt.
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/hf \
    HF_HUB_ENABLE_HF_TRANSFER=0

WORKDIR /app
COPY requirements.txt /app/requirements.txt
RUN python -m pip install --upgrade pip && python -m pip install -r /app/requirements.txt

# Bake the base model, the refiner and the fp16-fix VAE into the image (build-time download, offline at run time).
COPY download_weights.py /app/download_weights.py
ARG SDXL_MODEL_ID=stabilityai/stable-diffusion-xl-base-1.0
ARG REFINER_MODEL_ID=stabilityai/stable-diffusion-xl-refiner-1.0
ARG VAE_MODEL_ID=madebyollin/sdxl-vae-fp16-fix
RUN python /app/download_weights.py --base "$SDXL_MODEL_ID" --refiner "$REFINER_MODEL_ID" --vae "$VAE_MODEL_ID"

COPY handler.py schemas.py test_input.json test_input_with_lora.json /app/
COPY sdxl_worker /app/sdxl_worker

# The LoRA cache lives on the network volume when one is mounted (/runpod-volume/loras), else here.
RUN mkdir -p /models/loras
CMD ["python", "-u", "handler.py"]
