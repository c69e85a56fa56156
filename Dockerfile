# One image for every service of the Data Transfer System (managers, workers, API).
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends rsync openssl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
ENV CCAT_DATA_TRANSFER_ENV=production
ENTRYPOINT ["ccat_data_transfer"]
