# tiedlora on NVIDIA's NeMo Framework container: PyTorch, megatron-core, apex, transformer-engine,
# Hydra, SentencePiece and the metrics libraries are already in it, so this installs tiedlora
# alone (--no-deps; the container's PIP_CONSTRAINT stays untouched). Build and import for pyxis:
#   docker build -t tiedlora:nemo-26.02 .
#   enroot import -o /lustre/containers/tiedlora+nemo-26.02.sqsh dockerd://tiedlora:nemo-26.02
# docs/slurm.md shows how conf/launcher/ngc.yaml runs it with srun --container-image.
# 26.02 = NeMo 2.7.0, megatron-core 0.16.0 (a build from main), PyTorch 2.10.0a0, TE 2.12 (its
# release notes); docs/versions.md says which of these CI tests. Not 25.11: its megatron-core
# 0.15 shards SwiGLU's fc1 in a way that gives wrong tensor-parallel results.
FROM nvcr.io/nvidia/nemo:26.02

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
