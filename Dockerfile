# guardproxy as a sidecar: the policy directory is mounted at /etc/guardproxy.
#
# The image holds no policy and no accounts file: a baked-in accounts file would carry
# whatever keys were in the build context (the README's demo keys are public). Mount
# your own directory with default.yaml and the accounts file it names:
#   docker run -p 8080:8080 -v /srv/guardproxy:/etc/guardproxy guardproxy
# or point GUARDPROXY_POLICY (or --policy) at another file. To try the built-in demo
# policy and fake model instead (it ships inside the package; demo keys reach only the
# fake model):
#   docker run -p 8080:8080 -e GUARDPROXY_POLICY= guardproxy --demo
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY guardproxy ./guardproxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home guardproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER guardproxy
ENV GUARDPROXY_POLICY=/etc/guardproxy/default.yaml \
    PYTHONUNBUFFERED=1
EXPOSE 8080
VOLUME ["/etc/guardproxy"]
# /healthz, not /readyz: Docker's one health check drives restarts (Swarm, autoheal),
# and restarting the proxy never fixes an unreachable Redis; readiness (/readyz: policy
# loaded, state store reachable or allowed to fail) is for the load balancer / Kubernetes.
# With admin.listen in the policy, /admin and /metrics are on that address, not on 8080.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["guardproxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
