#!/usr/bin/env bash
# The can-dra demo on kind: builds the images, creates a cluster with DRA and CDI, installs the
# chart and runs four demos, each checked from the pods' own logs:
#   (a) two pods share a node-local virtual bus
#   (b) shaping: a slow, lossy member receives fewer frames than a plain one
#   (c) pods share one physical controller (a vcan stand-in on the worker node)
#   (d) a listen-only monitor hears the bus and cannot transmit on it
#
# Needs: Docker, kind, kubectl, helm, and the host kernel's CAN modules (kind nodes share the
# host kernel). Environment: CLUSTER (default can-dra), KEEP_CLUSTER=1 to keep the cluster,
# SKIP_BUILD=1 to reuse images already built.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CLUSTER=${CLUSTER:-can-dra}
WORKER="${CLUSTER}-worker"
NS=can-dra-demo
MANIFESTS="$HERE/manifests"
FAILURES=0

say() { printf '\n== %s\n' "$*"; }
die() {
	printf 'run.sh: %s\n' "$*" >&2
	exit 1
}

# check DESCRIPTION CONDITION...: prints the outcome and counts failures.
check() {
	local what=$1
	shift
	if "$@"; then
		printf '   ok: %s\n' "$what"
	else
		printf '   FAILED: %s\n' "$what"
		FAILURES=$((FAILURES + 1))
	fi
}

# frames POD ID [CONTAINER]: how many frames with the CAN id ID (hex, as candump prints it) the
# pod's candump printed.
frames() {
	local container=()
	if [ $# -ge 3 ]; then container=(-c "$3"); fi
	kubectl -n "$NS" logs "$1" "${container[@]}" | awk -v id="$2" '$2 == id { n++ } END { print n + 0 }'
}

wait_running() {
	kubectl -n "$NS" wait --for=condition=Ready --timeout=180s "$@"
}

wait_succeeded() {
	kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded --timeout=180s "$@"
}

# devices POD: the devices allocated to the pod's claims.
devices() {
	kubectl -n "$NS" get resourceclaims -o json |
		POD="$1" python3 -c '
import json, os, sys
for claim in json.load(sys.stdin)["items"]:
    owners = [o["name"] for o in claim["metadata"].get("ownerReferences", [])]
    if os.environ["POD"] in owners:
        for r in claim.get("status", {}).get("allocation", {}).get("devices", {}).get("results", []):
            print(r["pool"] + "/" + r["device"])'
}

between() { [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }

# --- Prerequisites ----------------------------------------------------------------------------
for tool in docker kind kubectl helm python3; do
	command -v "$tool" >/dev/null || die "$tool is required"
done
docker info >/dev/null 2>&1 || die "Docker is not running (docker info failed)"

say "Kernel modules (kind nodes use the host kernel)"
for module in vcan vxcan can-gw can-raw; do
	if [ -d "/sys/module/${module//-/_}" ]; then
		echo "   $module: loaded"
	elif modprobe "$module" 2>/dev/null || sudo modprobe "$module"; then
		echo "   $module: loaded now"
	else
		die "cannot load kernel module $module (is this kernel built with CAN support?)"
	fi
done

# --- Cluster, images, chart -------------------------------------------------------------------
say "Cluster $CLUSTER"
if kind get clusters | grep -qx "$CLUSTER"; then
	echo "   exists, reusing it"
else
	kind create cluster --name "$CLUSTER" --config "$HERE/kind-config.yaml" --wait 120s
fi
if [ "${KEEP_CLUSTER:-0}" != 1 ]; then
	trap 'say "Deleting cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"; kind delete cluster --name "$CLUSTER"' EXIT
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
	say "Building images"
	docker build -f "$ROOT/deploy/Dockerfile" --target kubelet-plugin -t can-dra-kubelet-plugin:dev "$ROOT"
	docker build -f "$ROOT/deploy/Dockerfile" --target controller -t can-dra-controller:dev "$ROOT"
	docker build -f "$HERE/tools.Dockerfile" -t can-dra-demo-tools:dev "$HERE"
fi
kind load docker-image --name "$CLUSTER" can-dra-kubelet-plugin:dev can-dra-controller:dev can-dra-demo-tools:dev

say "vcan0 on $WORKER: the stand-in for a physical CAN adapter"
docker exec "$WORKER" sh -c 'ip link show vcan0 >/dev/null 2>&1 || ip link add vcan0 type vcan; ip link set vcan0 up'

say "Installing the chart"
helm upgrade --install can-dra "$ROOT/deploy/helm/can-dra" --namespace can-dra --create-namespace \
	-f "$HERE/values.yaml"
kubectl -n can-dra rollout status daemonset/can-dra-kubelet-plugin --timeout=300s

say "Waiting for $WORKER's devices"
for _ in $(seq 60); do
	count=$(kubectl get resourceslices --field-selector "spec.driver=can.dra.dev,spec.nodeName=$WORKER" \
		-o jsonpath='{range .items[*]}{range .spec.devices[*]}{.name}{"\n"}{end}{end}' | grep -c . || true)
	[ "$count" -gt 0 ] && break
	sleep 2
done
kubectl get resourceslices --field-selector "spec.nodeName=$WORKER" \
	-o jsonpath='{range .items[*]}{range .spec.devices[*]}   {.name}{"\n"}{end}{end}'
check "the worker publishes the vcan0 slots and the demo bus" test "${count:-0}" -ge 12

kubectl apply -f "$MANIFESTS/00-namespace.yaml" -f "$MANIFESTS/01-demo-bus-member.yaml"

# --- (a) a node-local virtual bus ---------------------------------------------------------------
say "(a) Two pods share the node-local virtual bus 'demo'"
kubectl apply -f "$MANIFESTS/a-virtual-bus.yaml"
wait_succeeded pod/a-receiver
echo "   a-receiver got $(devices a-receiver), a-sender got $(devices a-sender)"
kubectl -n "$NS" logs a-receiver | tail -n 3
check "a-receiver printed 50 frames from a-sender (id 123)" test "$(frames a-receiver 123)" -eq 50
kubectl delete -f "$MANIFESTS/a-virtual-bus.yaml" --wait

# --- (b) shaping --------------------------------------------------------------------------------
say "(b) Shaping: b-slow-lossy receives with 50 ms delay and 25% loss"
kubectl apply -f "$MANIFESTS/b-shaping.yaml"
wait_running pod/b-fast pod/b-slow-lossy
kubectl apply -f "$MANIFESTS/b-shaping-sender.yaml"
wait_succeeded pod/b-sender
sleep 3 # the delayed frames drain
fast=$(frames b-fast 200)
slow=$(frames b-slow-lossy 200)
echo "   of 200 frames sent: b-fast received $fast, b-slow-lossy received $slow"
check "the plain member received all 200 frames" test "$fast" -eq 200
check "the lossy member lost about a quarter (100..190 received)" between "$slow" 100 190
kubectl delete -f "$MANIFESTS/b-shaping-sender.yaml" -f "$MANIFESTS/b-shaping.yaml" --wait

# --- (c) one physical controller, shared ------------------------------------------------------
say "(c) Three pods share the physical controller vcan0"
kubectl apply -f "$MANIFESTS/c-physical.yaml"
wait_running pod/c-reader-1 pod/c-reader-2
kubectl apply -f "$MANIFESTS/c-physical-writer.yaml"
wait_succeeded pod/c-writer
sleep 1
for pod in c-reader-1 c-reader-2 c-writer; do
	echo "   $pod got $(devices "$pod")"
done
check "c-reader-1 received the writer's 100 frames (id 321)" test "$(frames c-reader-1 321)" -eq 100
check "c-reader-2 received the writer's 100 frames (id 321)" test "$(frames c-reader-2 321)" -eq 100
kubectl delete -f "$MANIFESTS/c-physical-writer.yaml" -f "$MANIFESTS/c-physical.yaml" --wait

# --- (d) a listen-only monitor ----------------------------------------------------------------
say "(d) A listen-only monitor hears the bus and cannot transmit"
kubectl apply -f "$MANIFESTS/d-listen-only.yaml"
wait_running pod/d-monitor pod/d-witness
kubectl apply -f "$MANIFESTS/d-listen-only-sender.yaml"
wait_succeeded pod/d-sender
sleep 2
heard=$(frames d-monitor 400 candump)
leaked=$(frames d-witness 7FF)
seen=$(frames d-witness 400)
echo "   d-monitor heard $heard of 100 frames; d-witness saw $seen of them and $leaked from the monitor"
check "the monitor heard all 100 frames (id 400)" test "$heard" -eq 100
check "the witness saw all 100 frames (id 400)" test "$seen" -eq 100
check "nothing the monitor sent reached the bus (id 7FF)" test "$leaked" -eq 0
kubectl delete -f "$MANIFESTS/d-listen-only-sender.yaml" -f "$MANIFESTS/d-listen-only.yaml" --wait
kubectl delete -f "$MANIFESTS/00-namespace.yaml" --wait

say "Summary"
if [ "$FAILURES" -eq 0 ]; then
	echo "   every check passed"
else
	echo "   $FAILURES check(s) failed"
	exit 1
fi
