# guardproxy as a sidecar: one YAML policy mounted at /etc/guardproxy.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guardproxy ./guardproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home guardproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY policies /etc/guardproxy
USER guardproxy
ENV GUARDPROXY_POLICY=/etc/guardproxy/default.yaml \
    PYTHONUNBUFFERED=1
EXPOSE 8080
VOLUME ["/etc/guardproxy"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["guardproxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
