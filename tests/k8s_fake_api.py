"""FakeKubeAPI — a TEST DOUBLE of the few Kubernetes API endpoints the k8s executor (common/executors/k8s.py) calls.

It is not a Kubernetes server and implements no scheduling, admission or validation. It answers, on
127.0.0.1 with a free port, over plain HTTP/1.1:

    GET    /apis/batch/v1/namespaces/{ns}/jobs[?watch=true]      list or watch Jobs (fieldSelector metadata.name=)
    POST   /apis/batch/v1/namespaces/{ns}/jobs                   create a Job (recorded in ``created``)
    GET    /apis/batch/v1/namespaces/{ns}/jobs/{name}            read a Job
    DELETE /apis/batch/v1/namespaces/{ns}/jobs/{name}            delete a Job and its pods (``deleted``)
    GET    /api/v1/namespaces/{ns}/pods[?watch=true]             list or watch pods (labelSelector a=b,c=d;
                                                                 fieldSelector metadata.name=)
    GET    /api/v1/namespaces/{ns}/pods/{name}/log?follow=true   the pod's log, streamed
    GET    /apis/trainer.kubeflow.org/v1alpha1                   API discovery: TrainJobs served (``trainer_installed``)
    GET/POST/DELETE .../trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs[/{name}]   TrainJobs, as Jobs above

A created TrainJob gets ``spec.trainer.numNodes`` simulated pods (labels of its runtime patch's pod template +
``batch.kubernetes.io/job-completion-index``, container "node"): all run once somebody watches node 0; nodes with a
failing ``node_outcomes[i]`` end first, node 0 ends after its log was served (failed too when another node did, as
a rank that lost its peer); then the TrainJob gets Complete / Failed once somebody watches TrainJobs.

Watches send newline-delimited JSON events (chunked), replay every event after the requested
resourceVersion, and end cleanly at ``timeoutSeconds``. ``drop_job_watches = n`` makes the next n Job
watches close their connection abruptly (no final chunk) just before they would send an event;
``expire_next_job_watch`` answers the next Job watch with a 410 Gone ERROR event. The executor must recover
from both.

A created Job gets one simulated pod, moved along by a "kubelet" thread: Pending → Running once somebody
watches its pods → its log is served → (success) the step's ``_manifest.json`` is written into the local
store named by the container's ASRFT_ARTIFACTS/ASRFT_RUN_ID (settings decoded from its ASRFT_<STEP>_* env),
so a second run can really skip done steps → Succeeded, or Failed with a termination message. A failed pod
is replaced by a new one while the Job's backoffLimit allows (``outcomes[step]`` may list one Outcome per
attempt). The Job gets its Complete/Failed condition once somebody watches the Job. Every wait in here is bounded (``STEP_WAIT_S``),
so a misbehaving client makes a test slow and failing, never hung.
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from common.core.stage import MANIFEST, code_version

STEP_WAIT_S = 10.0  # longest the simulated kubelet waits for the client before moving on anyway
IDLE_CHECK_S = 0.2  # how often an idle watch checks whether its client went away
SIM_STAGE_PREFIX = "ASRFT_"


@dataclass
class Outcome:
    """How a simulated step ends: exit code 0 writes its manifest; anything else fails with ``message``
    in the container's termination message."""

    exit_code: int = 0
    message: str = ""
    log: list[str] = field(default_factory=list)
    stuck: str | None = None  # the pod never starts: its container waits with this reason (ImagePullBackOff)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _match_labels(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


def _match_fields(selector: str, obj: dict[str, Any]) -> bool:
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if key != "metadata.name":
            raise ValueError(f"the test double supports only fieldSelector metadata.name, got {key}")
        if obj["metadata"]["name"] != value:
            return False
    return True


class FakeKubeAPI:
    """See the module docstring. Use as a context manager; ``url`` is its base address."""

    def __init__(self, outcomes: dict[str, Outcome | list[Outcome]] | None = None):
        self.outcomes = outcomes or {}  # step → its outcome, or one per attempt (retries under backoffLimit)
        self.created: list[dict[str, Any]] = []  # Job bodies as the client sent them
        self.deleted: list[str] = []
        self.watches: Counter[str] = Counter()  # "jobs" / "pods" watch connections opened
        self.pod_phases: dict[str, list[str]] = {}  # pod name → phases it went through
        self.drop_job_watches = 0  # the next n Job watches break before their first event
        self.expire_next_job_watch = False
        self.dropped = self.expired = 0
        self.trainer_installed = True  # serve trainer.kubeflow.org/v1alpha1 (TrainJob CRD installed)
        self.node_outcomes: dict[int, Outcome] = {}  # TrainJob node index → its outcome (default: success)
        self._cond = threading.Condition()
        self._rv = 0
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) → object
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, kind, type, object)
        self._watching: list[tuple[str, str, str]] = []  # open watches: (kind, labelSelector, fieldSelector)
        self._log_sent: set[str] = set()
        self._pod_outcome: dict[str, Outcome] = {}
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    # -------------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> FakeKubeAPI:
        thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-kube-api", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for t in self._threads:
            t.join(timeout=STEP_WAIT_S)

    def write_kubeconfig(self, path: Path, namespace: str = "asr-ft-test") -> Path:
        """A kubeconfig whose only context points at this server (no credentials)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "nobody", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "nobody", "namespace": namespace}}],
        }
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # -------------------------------------------------------------------------------------- state

    def _put(self, kind: str, obj: dict[str, Any], event: str) -> None:
        """Record an object change as the next resourceVersion (caller holds the lock)."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if event == "DELETED":
            self._objects.pop((kind, obj["metadata"]["name"]), None)
        else:
            self._objects[(kind, obj["metadata"]["name"])] = obj
        self._events.append((self._rv, kind, event, json.loads(json.dumps(obj))))
        self._cond.notify_all()

    def _wait(self, predicate: Any) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._closed or predicate(), timeout=STEP_WAIT_S)

    def _watched(self, kind: str, obj: dict[str, Any]) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return any(k == kind and _match_labels(ls, labels) and _match_fields(fs, obj) for k, ls, fs in self._watching)

    def jobs(self) -> list[dict[str, Any]]:
        with self._cond:
            return [o for (k, _), o in self._objects.items() if k == "jobs"]

    # -------------------------------------------------------------------------------------- API verbs

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if kind == "jobs":
            return self.create_job(namespace, body)
        if not self.trainer_installed:
            return 404, _status(404, "NotFound", "the server could not find the requested resource")
        name = body["metadata"]["name"]
        with self._cond:
            if ("trainjobs", name) in self._objects:
                return 409, _status(409, "AlreadyExists", f'trainjobs "{name}" already exists')
            self.created.append(json.loads(json.dumps(body)))
            tj = json.loads(json.dumps(body))
            tj["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now())
            tj["status"] = {}
            self._put("trainjobs", tj, "ADDED")
            created = json.loads(json.dumps(tj))
        thread = threading.Thread(target=self._trainer, args=(created,), name=f"trainer-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return 201, created

    def create_job(self, namespace: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body["metadata"]["name"]
        with self._cond:
            if ("jobs", name) in self._objects:
                return 409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists')
            self.created.append(json.loads(json.dumps(body)))
            job = json.loads(json.dumps(body))
            job["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=_now())
            job["status"] = {"active": 1, "startTime": _now()}
            self._put("jobs", job, "ADDED")
            created = json.loads(json.dumps(job))
        thread = threading.Thread(target=self._kubelet, args=(created,), name=f"kubelet-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return 201, created

    def delete_job(self, name: str, kind: str = "jobs") -> tuple[int, dict[str, Any]]:
        with self._cond:
            job = self._objects.get((kind, name))
            if job is None:
                return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
            self.deleted.append(name)
            for (k, _), pod in list(self._objects.items()):
                owners = pod["metadata"].get("ownerReferences") or []
                if k == "pods" and any(o["uid"] == job["metadata"]["uid"] for o in owners):
                    self._put("pods", pod, "DELETED")
            self._put(kind, job, "DELETED")
        return 200, _status(200, "", "", status="Success")

    # -------------------------------------------------------------------------------------- the kubelet

    def _attempts(self, stage: str) -> list[Outcome]:
        outcome = self.outcomes.get(stage, Outcome())
        return list(outcome) if isinstance(outcome, (list, tuple)) else [outcome]

    def _kubelet(self, job: dict[str, Any]) -> None:
        """Run the Job's pods one after another, as the Job controller would, up to backoffLimit retries."""
        name, uid = job["metadata"]["name"], job["metadata"]["uid"]
        attempts = self._attempts(job["metadata"]["labels"]["asr-ft/stage"])
        backoff_limit = job["spec"].get("backoffLimit", 6)
        failed = 0
        while True:
            outcome = attempts[min(failed, len(attempts) - 1)]
            phase = self._run_pod(job, outcome)
            if phase == "Pending":
                return  # stuck for good, as a real Job would be
            if phase == "Succeeded":
                break
            failed += 1
            if failed > backoff_limit:
                break
            with self._cond:  # a retry: the controller counts the failure and starts a new pod
                current = self._objects.get(("jobs", name))
                if current is None or current["metadata"]["uid"] != uid:
                    return
                current = json.loads(json.dumps(current))
                current["status"] = {"failed": failed, "active": 1, "startTime": _now()}
                self._put("jobs", current, "MODIFIED")
        self._wait(lambda: self._watched("jobs", job))
        with self._cond:
            current = self._objects.get(("jobs", name))
            if current is None or current["metadata"]["uid"] != uid:
                return  # deleted meanwhile
            current = json.loads(json.dumps(current))
            if phase == "Succeeded":
                current["status"] = {"succeeded": 1, "failed": failed, "completionTime": _now(),
                                     "conditions": [{"type": "Complete", "status": "True"}]}
            else:
                current["status"] = {"failed": failed, "conditions": [
                    {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit"}]}
            self._put("jobs", current, "MODIFIED")

    def _run_pod(self, job: dict[str, Any], outcome: Outcome) -> str:
        """One pod of the Job, Pending → Running → Succeeded/Failed (or stuck Pending); returns its last phase."""
        name = job["metadata"]["name"]
        template = job["spec"]["template"]
        container = template["spec"]["containers"][0]
        stage = job["metadata"]["labels"]["asr-ft/stage"]
        pod_name = f"{name}-{uuid.uuid4().hex[:5]}"
        labels = {**template["metadata"]["labels"], "job-name": name, "batch.kubernetes.io/job-name": name,
                  "controller-uid": job["metadata"]["uid"]}
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": job["metadata"]["namespace"], "uid": str(uuid.uuid4()),
                         "labels": labels, "creationTimestamp": _now(),
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                              "uid": job["metadata"]["uid"], "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": template["spec"],
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/1 nodes are available: waiting for the test double"}]},
        }
        with self._cond:
            self.pod_phases[pod_name] = ["Pending"]
            self._pod_outcome[pod_name] = outcome
            self._put("pods", pod, "ADDED")
        self._wait(lambda: self._watched("pods", pod))
        if outcome.stuck:
            waiting = {"name": container["name"], "image": container["image"], "imageID": "", "ready": False,
                       "restartCount": 0, "state": {"waiting": {"reason": outcome.stuck,
                                                                "message": f"Back-off pulling image {container['image']}"}}}
            with self._cond:
                pod = json.loads(json.dumps(pod))
                pod["status"] = {"phase": "Pending", "containerStatuses": [waiting],
                                 "conditions": [{"type": "PodScheduled", "status": "True"}]}
                self._put("pods", pod, "MODIFIED")
            return "Pending"
        status = {"name": container["name"], "image": container["image"], "imageID": "", "ready": True,
                  "restartCount": 0, "state": {"running": {"startedAt": _now()}}}
        with self._cond:
            pod = json.loads(json.dumps(pod))
            pod["status"] = {"phase": "Running", "startTime": _now(), "containerStatuses": [status],
                             "conditions": [{"type": "PodScheduled", "status": "True"}]}
            self.pod_phases[pod_name].append("Running")
            self._put("pods", pod, "MODIFIED")
        self._wait(lambda: pod_name in self._log_sent)
        if outcome.exit_code == 0:
            _write_manifest(stage, {e["name"]: e.get("value", "") for e in container.get("env", [])})
        phase = "Succeeded" if outcome.exit_code == 0 else "Failed"
        terminated = {"exitCode": outcome.exit_code, "reason": "Completed" if phase == "Succeeded" else "Error",
                      "startedAt": _now(), "finishedAt": _now()}
        if outcome.message:
            terminated["message"] = outcome.message
        with self._cond:
            pod = json.loads(json.dumps(pod))
            pod["status"]["phase"] = phase
            pod["status"]["containerStatuses"][0].update(ready=False, state={"terminated": terminated})
            self.pod_phases[pod_name].append(phase)
            self._put("pods", pod, "MODIFIED")
        return phase

    def _trainer(self, tj: dict[str, Any]) -> None:
        """Kubeflow Trainer + JobSet, simulated: numNodes pods, run together; see the module docstring."""
        name, uid = tj["metadata"]["name"], tj["metadata"]["uid"]
        trainer = tj["spec"]["trainer"]
        patch = tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        template = patch["template"]["spec"]["template"]
        pods = []
        with self._cond:
            for index in range(trainer["numNodes"]):
                labels = {**template["metadata"]["labels"], "batch.kubernetes.io/job-completion-index": str(index),
                          "jobset.sigs.k8s.io/jobset-name": name}
                pod = {"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": f"{name}-node-0-{index}-{uuid.uuid4().hex[:5]}",
                                    "namespace": tj["metadata"]["namespace"], "uid": str(uuid.uuid4()),
                                    "labels": labels, "creationTimestamp": _now(),
                                    "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": f"{name}-node-0",
                                                         "uid": uid, "controller": True}]},
                       "spec": {**template["spec"], "containers": [{"name": "node", "image": trainer["image"],
                                                                    "command": trainer["command"], "env": trainer["env"]}]},
                       "status": {"phase": "Pending"}}
                self.pod_phases[pod["metadata"]["name"]] = ["Pending"]
                self._pod_outcome[pod["metadata"]["name"]] = self.node_outcomes.get(index, Outcome())
                self._put("pods", pod, "ADDED")
                pods.append(pod)
        self._wait(lambda: self._watched("pods", pods[0]))
        with self._cond:
            for i, pod in enumerate(pods):
                pods[i] = pod = json.loads(json.dumps(pod))
                pod["status"] = {"phase": "Running", "containerStatuses": [
                    {"name": "node", "image": trainer["image"], "imageID": "", "ready": True, "restartCount": 0,
                     "state": {"running": {"startedAt": _now()}}}]}
                self.pod_phases[pod["metadata"]["name"]].append("Running")
                self._put("pods", pod, "MODIFIED")
        failing = {i for i in range(len(pods)) if self.node_outcomes.get(i, Outcome()).exit_code}
        order = sorted(failing - {0}) + [0] + sorted(set(range(1, len(pods))) - failing)
        for second, i in enumerate(order):
            pod = pods[i]
            pod_name = pod["metadata"]["name"]
            outcome = self._pod_outcome[pod_name]
            if i == 0:
                self._wait(lambda name=pod_name: name in self._log_sent)
                if failing - {0} and not outcome.exit_code:
                    outcome = Outcome(1, "finetune: rank 0 of 2: DistBackendError: connection closed by peer")
            if i == 0 and not failing:
                container = pod["spec"]["containers"][0]
                _write_manifest("finetune", {e["name"]: e.get("value", "") for e in container["env"] if "value" in e})
            phase = "Failed" if outcome.exit_code else "Succeeded"
            terminated = {"exitCode": outcome.exit_code, "reason": "Error" if outcome.exit_code else "Completed",
                          "startedAt": "2026-01-01T00:00:00Z", "finishedAt": f"2026-01-01T00:00:{10 + second:02d}Z"}
            if outcome.message:
                terminated["message"] = outcome.message
            with self._cond:
                pod = json.loads(json.dumps(pod))
                pod["status"]["phase"] = phase
                pod["status"]["containerStatuses"][0].update(ready=False, state={"terminated": terminated})
                self.pod_phases[pod["metadata"]["name"]].append(phase)
                self._put("pods", pod, "MODIFIED")
        self._wait(lambda: self._watched("trainjobs", tj))
        with self._cond:
            current = self._objects.get(("trainjobs", name))
            if current is None or current["metadata"]["uid"] != uid:
                return
            current = json.loads(json.dumps(current))
            current["status"] = {"conditions": [
                {"type": "Failed", "status": "True", "reason": "JobsFailed", "message": "jobset failed"} if failing
                else {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "done"}]}
            self._put("trainjobs", current, "MODIFIED")

    def log_lines(self, pod_name: str) -> list[str]:
        stage = self._objects[("pods", pod_name)]["metadata"]["labels"]["asr-ft/stage"]
        outcome = self._pod_outcome[pod_name]
        return outcome.log or [f"{stage}: starting", f"{stage}: working", f"{stage}: 完成 done"]


def _write_manifest(stage: str, env: dict[str, str]) -> None:
    """What a successful step leaves behind (only what the orchestrator reads), written atomically."""
    if stage == "demo-data":
        return  # demo-data writes no manifest
    prefix = f"{SIM_STAGE_PREFIX}{stage.upper().replace('-', '_')}_"
    settings: dict[str, Any] = {}
    for key, value in env.items():
        if key.startswith(prefix):
            try:
                settings[key[len(prefix):].lower()] = json.loads(value)
            except ValueError:
                settings[key[len(prefix):].lower()] = value
    folder = Path(env["ASRFT_ARTIFACTS"]) / env["ASRFT_RUN_ID"] / stage
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"stage": stage, "code_version": code_version(), "fingerprint": "test-double",
                "settings": settings, "outputs": [], "finished": _now()}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, folder / MANIFEST)


def _status(code: int, reason: str, message: str, status: str = "Failure") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "status": status, "reason": reason, "message": message, "code": code}


def _handler_for(api: FakeKubeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms each.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        # ---------------------------------------------------------------------------- plumbing

        def _json(self, code: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _start_stream(self, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _end_stream(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _drop(self) -> None:
            """Cut the connection mid-stream, as a broken network or a restarted API server would."""
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

        def _client_gone(self) -> bool:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            try:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _route(self) -> tuple[str, str, str | None, str | None, dict[str, str]]:
            url = urlparse(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            parts = url.path.strip("/").split("/")
            # apis/batch/v1/namespaces/NS/jobs[/NAME] or api/v1/namespaces/NS/pods[/NAME[/log]]
            base = 5 if parts[0] == "apis" else 4  # index of the resource kind
            ns, kind = parts[base - 1], parts[base]
            name = parts[base + 1] if len(parts) > base + 1 else None
            sub = parts[base + 2] if len(parts) > base + 2 else None
            return ns, kind, name, sub, query

        # ---------------------------------------------------------------------------- verbs

        def do_GET(self) -> None:
            if urlparse(self.path).path.strip("/") == "apis/trainer.kubeflow.org/v1alpha1":
                if not api.trainer_installed:
                    return self._json(404, _status(404, "NotFound", "the server could not find the requested resource"))
                return self._json(200, {"kind": "APIResourceList", "apiVersion": "v1",
                                        "groupVersion": "trainer.kubeflow.org/v1alpha1",
                                        "resources": [{"name": "trainjobs", "singularName": "trainjob", "namespaced": True, "kind": "TrainJob",
                                                       "verbs": ["create", "delete", "get", "list", "watch"]}]})
            ns, kind, name, sub, query = self._route()
            if sub == "log":
                return self._log(name)
            if name is not None:
                with api._cond:
                    obj = api._objects.get((kind, name))
                if obj is None:
                    return self._json(404, _status(404, "NotFound", f'{kind} "{name}" not found'))
                return self._json(200, obj)
            if query.get("watch") in ("true", "1"):
                return self._watch(kind, query)
            with api._cond:
                items = [o for (k, _), o in api._objects.items() if k == kind and self._selected(o, query)]
                rv = str(api._rv)
            list_kind = {"jobs": "JobList", "pods": "PodList", "trainjobs": "TrainJobList"}[kind]
            api_version = {"jobs": "batch/v1", "pods": "v1", "trainjobs": "trainer.kubeflow.org/v1alpha1"}[kind]
            self._json(200, {"apiVersion": api_version, "kind": list_kind, "metadata": {"resourceVersion": rv},
                             "items": items})

        def do_POST(self) -> None:
            ns, kind, _, _, _ = self._route()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            code, obj = api.create(kind, ns, body)
            self._json(code, obj)

        def do_DELETE(self) -> None:
            _, kind, name, _, _ = self._route()
            length = int(self.headers.get("Content-Length", 0))
            if length:
                self.rfile.read(length)
            code, obj = api.delete_job(name, kind)
            self._json(code, obj)

        def _selected(self, obj: dict[str, Any], query: dict[str, str]) -> bool:
            return _match_labels(query.get("labelSelector", ""), obj["metadata"].get("labels") or {}) and \
                _match_fields(query.get("fieldSelector", ""), obj)

        # ---------------------------------------------------------------------------- streams

        def _watch(self, kind: str, query: dict[str, str]) -> None:
            last = int(query.get("resourceVersion") or api._rv)
            timeout = float(query.get("timeoutSeconds") or 30)
            key = (kind, query.get("labelSelector", ""), query.get("fieldSelector", ""))
            self._start_stream("application/json")
            with api._cond:
                api.watches[kind] += 1
                drop = kind == "jobs" and api.drop_job_watches > 0
                expire = kind == "jobs" and not drop and api.expire_next_job_watch
                api.drop_job_watches -= drop
                api.expire_next_job_watch &= not expire
            if expire:
                api.expired += 1
                event = {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
                self._chunk(json.dumps(event).encode() + b"\n")
                return self._end_stream()
            with api._cond:
                api._watching.append(key)
                api._cond.notify_all()
            try:
                deadline = timeout
                while deadline > 0:
                    with api._cond:
                        pending = [(rv, t, o) for rv, k, t, o in api._events
                                   if rv > last and k == kind and self._selected(o, query)]
                        if not pending and not api._closed:
                            api._cond.wait(timeout=IDLE_CHECK_S)
                            deadline -= IDLE_CHECK_S
                        if api._closed:
                            break
                    if pending and drop:
                        api.dropped += 1
                        return self._drop()
                    for rv, event_type, obj in pending:
                        self._chunk(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")
                        last = rv
                    if not pending and self._client_gone():
                        self.close_connection = True
                        return
                self._end_stream()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                with api._cond:
                    api._watching.remove(key)

        def _log(self, pod_name: str) -> None:
            with api._cond:
                if ("pods", pod_name) not in api._objects:
                    return self._json(404, _status(404, "NotFound", f'pods "{pod_name}" not found'))
            api._wait(lambda: api.pod_phases.get(pod_name, ["Pending"])[-1] != "Pending")
            self._start_stream("text/plain")
            try:
                for line in api.log_lines(pod_name):
                    data = (line + "\n").encode()
                    half = len(data) // 2  # split mid-line (and mid-character) to test the client's reassembly
                    self._chunk(data[:half])
                    self._chunk(data[half:])
                with api._cond:
                    api._log_sent.add(pod_name)
                    api._cond.notify_all()
                api._wait(lambda: api.pod_phases[pod_name][-1] in ("Succeeded", "Failed"))
                self._end_stream()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    return Handler
