FROM python:3.11-slim
# g++: train.py --compile (torch.compile builds its kernels with it)
RUN apt-get update && apt-get install -y --no-install-recommends make g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt requirements-packaged.txt Makefile ./
# CPU build of torch; another build: --build-arg TORCH="torch==2.13.0 --index-url URL" (quoted: one argument).
ARG TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
RUN make install TORCH="$TORCH" PYTHON=python3
COPY . .
RUN touch .venv/.installed
# the chat page and API of the demo run:
#   docker run -p 8000:8000 IMAGE sh -c "make demo && .venv/bin/python serve.py --host 0.0.0.0"
EXPOSE 8000
CMD ["make", "demo"]
