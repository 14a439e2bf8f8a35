FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml constraints.txt ./
COPY events events
COPY projections projections
COPY services services
COPY deploy deploy
COPY schemas schemas
RUN pip install --no-cache-dir -c constraints.txt .
ENV LEADLEDGER_RULES=/app/deploy/rules/default.yaml
