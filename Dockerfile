FROM python:3.11-slim
# g++: train.py --compile (torch.compile builds its kernels with it)
RUN apt-get update && apt-get install -y --no-install-recommends make g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt requirements-packaged.txt Makefile ./
# CPU build of torch; pass --build-arg TORCH=torch==2.13.0 --index-url ... for another build.
ARG TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
RUN make install TORCH="$TORCH" PYTHON=python3
COPY . .
RUN touch .venv/.installed
EXPOSE 8000
CMD ["make", "demo"]
