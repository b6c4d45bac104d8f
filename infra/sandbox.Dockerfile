# mathforge sandbox: the NeMo-Skills-compatible code execution server (mathforge/sandbox).
#
#   docker build -f infra/sandbox.Dockerfile -t mathforge-sandbox .
#   docker run --rm --read-only --tmpfs /tmp:size=1g --network none --pids-limit 512 --memory 8g \
#              --security-opt no-new-privileges:true --stop-signal SIGKILL mathforge-sandbox
#
# or `docker compose -f infra/compose.yaml up sandbox`. The server runs as PID 1 under a non-root uid
# with a read-only root filesystem; the only writable place is the /tmp tmpfs (per-session working
# directories). Without extra privileges Docker's seccomp profile refuses namespaces, so the server runs
# its workers in isolation mode "none" (process groups, rlimits, empty environment, private directory)
# and relies on the container for the network (--network none), the filesystem (read-only) and the
# process ceiling (--pids-limit); /health reports exactly what is in force.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TMPDIR=/tmp

# What model-written code may import: NeMo-Skills' requirements/code_execution.txt, plus IPython,
# whose shell (pretty-printed values, Plain tracebacks) the sandbox uses when it is installed.
RUN pip install ipython numpy pandas scipy sympy psutil tqdm h5py "annotated-types>=0.7.0" mpmath

# The server needs only these of mathforge's dependencies; --no-deps keeps torch & co. out of the image.
RUN pip install "fastapi>=0.115" "uvicorn>=0.30" "httpx>=0.27" "pydantic>=2.9" "pyyaml>=6"
COPY pyproject.toml README.md /src/
COPY mathforge /src/mathforge
COPY artifacts /src/artifacts
COPY flows /src/flows
COPY tasks /src/tasks
RUN pip install --no-deps /src && rm -rf /src && python -m compileall -q /usr/local/lib/python3.11

RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sandbox \
    && install -d -o 10001 -g 10001 -m 0755 /run/mathforge   # seeds the socket volume's ownership
USER 10001:10001
WORKDIR /tmp
EXPOSE 6000

# = `mathforge sandbox --host 0.0.0.0 --port 6000`, without loading the other sub-commands' modules.
ENTRYPOINT ["python", "-m", "mathforge.sandbox"]
CMD ["--host", "0.0.0.0", "--port", "6000"]
