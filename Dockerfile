# tiedlora on NVIDIA's NeMo Framework container: PyTorch, megatron-core, apex, transformer-engine,
# Hydra, SentencePiece and the metrics libraries are already in it, so this installs tiedlora
# alone (--no-deps; the container's PIP_CONSTRAINT stays untouched). Build and import for pyxis:
#   docker build -t tiedlora:nemo-25.11 .
#   enroot import -o /lustre/containers/tiedlora+nemo-25.11.sqsh dockerd://tiedlora:nemo-25.11
# docs/slurm.md shows how conf/launcher/ngc.yaml runs it with srun --container-image.
FROM nvcr.io/nvidia/nemo:25.11

WORKDIR /workspace/tiedlora
COPY pyproject.toml requirements.txt README.md ./
COPY tiedlora ./tiedlora
COPY conf ./conf
COPY launch ./launch
COPY recipes ./recipes
# editable: the Hydra configs (conf/) are read from the source tree next to the package
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e . \
    && python -c "import tiedlora.finetune, tiedlora.submit"

ENV TIEDLORA_CACHE=/workspace/cache
