FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt ./
COPY events events
COPY projections projections
COPY services services
COPY deploy deploy
COPY schemas schemas
COPY setup.py ./
# gcc only to compile the fold and the other compiled modules (setup.py, Cython); removed again in the same layer
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir -c constraints.txt . \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
ENV LEADLEDGER_RULES=/app/deploy/rules/default.yaml
