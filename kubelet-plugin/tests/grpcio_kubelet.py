"""A kubelet's gRPC calls to a DRA plugin, made with grpcio (the gRPC C core) instead of tonic.

Run by `grpcio_kubelet.rs`: `python3 grpcio_kubelet.py STUBS_DIR < plan.json > results.json`.
STUBS_DIR holds the `*_pb2.py` modules generated from the project's `proto/protos` by protoc;
the calls go through grpcio's generic `unary_unary` and `unary_stream` with the method paths
the kubelet's generated Go clients use, so no generated service stubs are needed.

The plan names the registration socket, the claims to prepare per round and the rounds: each
round sets `grpc.default_authority` to one value and runs, as the kubelet does,
  - on the registration socket: GetInfo, then NotifyRegistrationStatus(plugin_registered=True);
  - on the DRA service socket (the round's `endpoint`): NodePrepareResources, then
    NodeUnprepareResources, over DRA v1 or v1beta1, then the first report of the health v1
    stream (NodeWatchResources), which the kubelet keeps open on the same connection.
Every call's outcome is written out (the answer as a dict, or the gRPC status code and details),
and the Rust test asserts on them. The script itself asserts nothing, so one failed call does not
hide the others.
"""

import json
import sys

import grpc

sys.path.insert(0, sys.argv[1])

from dra.v1 import api_pb2 as dra_v1  # noqa: E402
from dra.v1beta1 import api_pb2 as dra_v1beta1  # noqa: E402
from dra_health.v1 import api_pb2 as health_v1  # noqa: E402
from pluginregistration.v1 import api_pb2 as registration  # noqa: E402

# The kubelet's timeouts: GetInfo 1 s (pluginwatcher), DRA calls 45 s. The kubelet's health
# stream has none; here the first report must come within HEALTH_TIMEOUT.
GET_INFO_TIMEOUT = 1.0
DRA_CALL_TIMEOUT = 45.0
HEALTH_TIMEOUT = 10.0

DRA = {
    "v1": (dra_v1, "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/"),
    "v1beta1": (dra_v1beta1, "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/"),
}


def channel(socket, authority):
    """A channel to a unix socket that sends `authority` as the HTTP/2 :authority."""
    return grpc.insecure_channel(
        "unix:" + socket, options=[("grpc.default_authority", authority)]
    )


def call(chan, path, request, response_type, timeout):
    method = chan.unary_unary(
        path,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    try:
        return {"ok": method(request, timeout=timeout)}
    except grpc.RpcError as error:
        return {"error": {"code": error.code().name, "details": error.details() or ""}}


def first_health_report(chan):
    """Opens NodeWatchResources (health v1) and returns its first report, then cancels it."""
    method = chan.unary_stream(
        "/v1.DRAResourceHealth/NodeWatchResources",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=health_v1.NodeWatchResourcesResponse.FromString,
    )
    stream = method(health_v1.NodeWatchResourcesRequest(), timeout=HEALTH_TIMEOUT)
    try:
        report = next(stream)
        return {
            "ok": [
                {
                    "pool_name": d.device.pool_name,
                    "device_name": d.device.device_name,
                    "health": health_v1.HealthStatus.Name(d.health),
                }
                for d in report.devices
            ]
        }
    except grpc.RpcError as error:
        return {"error": {"code": error.code().name, "details": error.details() or ""}}
    except StopIteration:
        return {"error": {"code": "ENDED", "details": "the stream ended without a report"}}
    finally:
        stream.cancel()


def prepared(answer):
    return {
        uid: {
            "error": result.error,
            "devices": [
                {
                    "request_names": list(device.request_names),
                    "pool_name": device.pool_name,
                    "device_name": device.device_name,
                    "cdi_device_ids": list(device.cdi_device_ids),
                }
                for device in result.devices
            ],
        }
        for uid, result in answer.claims.items()
    }


def unprepared(answer):
    return {uid: {"error": result.error} for uid, result in answer.claims.items()}


def run_round(registration_socket, plan_round):
    authority = plan_round["authority"]
    out = {"authority": authority}
    with channel(registration_socket, authority) as chan:
        info = call(
            chan,
            "/pluginregistration.Registration/GetInfo",
            registration.InfoRequest(),
            registration.PluginInfo,
            GET_INFO_TIMEOUT,
        )
        if "error" in info:
            out["get_info"] = info
        else:
            plugin = info["ok"]
            out["get_info"] = {
                "ok": {
                    "type": plugin.type,
                    "name": plugin.name,
                    "endpoint": plugin.endpoint,
                    "supported_versions": list(plugin.supported_versions),
                }
            }
            notify = call(
                chan,
                "/pluginregistration.Registration/NotifyRegistrationStatus",
                registration.RegistrationStatus(plugin_registered=True),
                registration.RegistrationStatusResponse,
                GET_INFO_TIMEOUT,
            )
            out["notify"] = {"ok": {}} if "ok" in notify else notify

    # The endpoint comes from the plan (the test checks GetInfo names the same one), so the
    # DRA socket is tried even when registration failed.
    module, service = DRA[plan_round["dra_version"]]
    claims = [module.Claim(**claim) for claim in plan_round["claims"]]
    with channel(plan_round["endpoint"], authority) as chan:
        prepare = call(
            chan,
            service + "NodePrepareResources",
            module.NodePrepareResourcesRequest(claims=claims),
            module.NodePrepareResourcesResponse,
            DRA_CALL_TIMEOUT,
        )
        out["prepare"] = {"ok": prepared(prepare["ok"])} if "ok" in prepare else prepare
        unprepare = call(
            chan,
            service + "NodeUnprepareResources",
            module.NodeUnprepareResourcesRequest(claims=claims),
            module.NodeUnprepareResourcesResponse,
            DRA_CALL_TIMEOUT,
        )
        out["unprepare"] = (
            {"ok": unprepared(unprepare["ok"])} if "ok" in unprepare else unprepare
        )
        out["health"] = first_health_report(chan)
    return out


def main():
    plan = json.load(sys.stdin)
    results = [run_round(plan["registration_socket"], r) for r in plan["rounds"]]
    json.dump({"grpcio_version": grpc.__version__, "rounds": results}, sys.stdout)


if __name__ == "__main__":
    main()
