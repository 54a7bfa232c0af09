#!/usr/bin/env bash
# Starts the local services the watcher talks to, on loopback, if they are not running:
# libvirtd (qemu:///system), RabbitMQ (127.0.0.1:5672) and a SeaweedFS S3 server
# (127.0.0.1:8333). There is no systemd here, so daemons are started directly.
# With --env, prints the S3 endpoint and credentials as VAR=value lines on stdout, and
# nothing else there: progress goes to stderr, so `eval "$(services.sh --env)"` is safe.
# LVW_S3_PORT/LVW_S3_DIR pick another S3 server (its other listeners sit just above the
# port); its pid is written to $LVW_S3_DIR.pid.
set -euo pipefail
cd "$(dirname "$0")/.."
# fd 3 is the real stdout, for --env only; everything else, daemons included, gets stderr.
exec 3>&1 1>&2

S3_DIR=${LVW_S3_DIR:-/var/tmp/libvirt-volume-watcher-s3}
S3_PORT=${LVW_S3_PORT:-8333}
export AWS_ACCESS_KEY_ID=${LVW_S3_ACCESS_KEY:-watcher}
export AWS_SECRET_ACCESS_KEY=${LVW_S3_SECRET_KEY:-watcher-secret}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "services: $what did not come up within ${limit}s" >&2; return 1
}

# Debian's udev rule makes /dev/kvm root:kvm 0660 so QEMU (user libvirt-qemu, group kvm)
# can use it; without udev it stays root-only and libvirt re-probes QEMU on every call.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  echo "services: starting libvirtd"
  # Debian's unit normally creates these; without systemd we do.
  mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/log/libvirt/qemu
  pgrep -x virtlogd >/dev/null || virtlogd -d 3>&-
  # A libvirtd that is still exiting holds its pid file; retry until one stays up.
  for _ in 1 2 3 4 5; do
    libvirtd -d 2>/dev/null 3>&- || true
    wait_for 6 libvirtd virsh -c qemu:///system version 2>/dev/null && break
  done
  wait_for 30 libvirtd virsh -c qemu:///system version
fi

if ! rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; then
  if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    echo "services: starting RabbitMQ"
    rabbitmq-server -detached 3>&- || true
    wait_for 60 RabbitMQ bash -c '(exec 3<>/dev/tcp/127.0.0.1/5672)'
  fi
fi
rabbitmqctl await_startup >/dev/null 2>&1 || true

s3_answers() {
  .venv/bin/python - <<PY >/dev/null 2>&1
from minio import Minio
Minio("127.0.0.1:$S3_PORT", "$AWS_ACCESS_KEY_ID", "$AWS_SECRET_ACCESS_KEY", secure=False).list_buckets()
PY
}
# A server of ours that holds its port but no longer answers is restarted: its parts talk
# over unix sockets in /tmp (a fixed path), which a clean-up of /tmp takes away.
if (exec 3<>/dev/tcp/127.0.0.1/$S3_PORT) 2>/dev/null && ! s3_answers; then
  old=$(cat "$S3_DIR.pid" 2>/dev/null || true)
  if [ -n "$old" ] && grep -qs weed "/proc/$old/cmdline"; then
    echo "services: the S3 server (pid $old) does not answer; restarting it"
    kill "$old" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$old" 2>/dev/null || true
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/$S3_PORT) 2>/dev/null || break; sleep 0.1; done
  fi
fi

if ! (exec 3<>/dev/tcp/127.0.0.1/$S3_PORT) 2>/dev/null; then
  echo "services: starting the S3 server on 127.0.0.1:$S3_PORT ($S3_DIR)"
  mkdir -p "$S3_DIR"
  p=$S3_PORT
  nohup .venv/bin/weed mini -dir="$S3_DIR" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -s3.port="$p" -s3.port.grpc=$((p + 1)) -master.port=$((p + 2)) \
      -master.port.grpc=$((p + 3)) -volume.port=$((p + 4)) -volume.port.grpc=$((p + 5)) \
      -filer.port=$((p + 6)) -filer.port.grpc=$((p + 7)) -webdav.port=$((p + 8)) \
      -admin.port=$((p + 9)) -admin.port.grpc=$((p + 10)) -s3.port.iceberg=0 \
      -s3.port.lance=0 -admin.ui=false >"$S3_DIR.log" 2>&1 </dev/null 3>&- &
  echo $! >"$S3_DIR.pid"
  wait_for 60 "the S3 server" bash -c "(exec 3<>/dev/tcp/127.0.0.1/$S3_PORT)"
  # The port opens before the filer behind it is ready; wait for a real answer.
  wait_for 60 "the S3 server" curl -fsS -o /dev/null "http://127.0.0.1:$S3_PORT/healthz" \
    || wait_for 30 "the S3 server" s3_answers
fi

if [ "${1:-}" = "--env" ]; then
  printf '%s=%q\n' LVW_S3_ENDPOINT "http://127.0.0.1:$S3_PORT" \
    LVW_S3_ACCESS_KEY "$AWS_ACCESS_KEY_ID" LVW_S3_SECRET_KEY "$AWS_SECRET_ACCESS_KEY" >&3
fi
echo "services: libvirtd, RabbitMQ and S3 are up" >&2
