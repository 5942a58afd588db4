#!/usr/bin/env python3
"""Config contract between the deploy files and the binaries.

For every service container in the rendered Kubernetes overlays and in
compose.yaml (with the Dockerfile's ENV for its target):

- every APP_* / OTEL_* variable set is one the binary reads
  (`<service> --env` lists them);
- every variable a deployment must set is set: those whose default points at
  loopback (database, NATS, user-service, bind addresses) and user-service's
  signing key;
- services bind 0.0.0.0 in containers, and the `grpc` / `admin` ports the
  manifests declare are the ports the services bind;
- every probe asks a path the admin server serves, on the admin port;
- every Secret the prod overlay references is named in deploy/README.md;
- the prod overlay runs the topology `shopctl chaos` rehearses (docs/scaling.md):
  a 3-node NATS StatefulSet, 3-replica streams for every service, at least
  2 replicas of each service, and the consumers' own names (no
  APP_CONSUMER_PREFIX override).

Usage: deploy_contract.py --bin DIR --k8s dev.yaml prod.yaml --compose compose.yaml
       --dockerfile Dockerfile --readme deploy/README.md --admin-src admin.rs
Exit 1 with one line per violation.
"""

import argparse
import re
import subprocess
import sys

import yaml

SERVICES = ("user-service", "order-service", "notification-service")


def reference(bin_dir, service):
    out = subprocess.run(
        [f"{bin_dir}/{service}", "--env"], check=True, capture_output=True, text=True
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def required(service, ref, env):
    """What a deployment must set: loopback defaults (SMTP only when the
    email channel is on), and the signing key."""
    email = "email" in env.get("APP_CHANNELS", ref.get("APP_CHANNELS", ""))
    groups = [
        {name}
        for name, default in sorted(ref.items())
        if "127.0.0.1" in default and (email or not name.startswith("APP_SMTP__"))
    ]
    if service == "user-service":
        groups.append({"APP_AUTH__SIGNING_KEY", "APP_AUTH__SIGNING_KEY_FILE"})
    return groups


def served_paths(admin_src):
    text = open(admin_src, encoding="utf-8").read()
    return set(re.findall(r'\.route\(\s*"(/[^"]*)"', text))


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def check_env(where, service, env, ref, problems):
    for name in sorted(env):
        if (name.startswith("APP_") or name.startswith("OTEL_")) and name not in ref:
            problems.append(f"{where}: {name} is not a variable {service} reads")
    for group in required(service, ref, env):
        if not group & set(env):
            problems.append(f"{where}: {' or '.join(sorted(group))} must be set")
    for name in ("APP_GRPC_ADDR", "APP_ADMIN_ADDR"):
        value = env.get(name)
        if value is not None and not value.startswith("0.0.0.0:"):
            problems.append(f"{where}: {name}={value} must bind 0.0.0.0 in a container")


def service_of_image(image):
    name = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    return name if name in SERVICES else None


def check_k8s(path, refs, paths, problems):
    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    secrets = set()
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            service = service_of_image(container["image"])
            if service is None:
                continue
            where = f"{path}: {doc['metadata']['name']}"
            env = {}
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef")
                if ref:
                    if ref["name"] not in configmaps:
                        problems.append(f"{where}: envFrom ConfigMap {ref['name']} is not defined")
                    env.update(configmaps.get(ref["name"], {}))
            for var in container.get("env", []):
                env[var["name"]] = var.get("value", "<from a reference>")
                key_ref = var.get("valueFrom", {}).get("secretKeyRef")
                if key_ref:
                    secrets.add(key_ref["name"])
            for volume in doc["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in volume:
                    secrets.add(volume["secret"]["secretName"])
            check_env(where, service, env, refs[service], problems)
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for name, var in (("grpc", "APP_GRPC_ADDR"), ("admin", "APP_ADMIN_ADDR")):
                bound = env.get(var, refs[service][var])
                if ports.get(name) != port_of(bound):
                    problems.append(
                        f"{where}: port {name} is {ports.get(name)} but {var}={bound}"
                    )
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                if probe is None:
                    problems.append(f"{where}: no {kind}")
                    continue
                get = probe.get("httpGet", {})
                if get.get("path", "").split("?")[0] not in paths:
                    problems.append(f"{where}: {kind} asks {get.get('path')}, not one of {sorted(paths)}")
                port = get.get("port")
                if port not in ("admin", ports.get("admin")):
                    problems.append(f"{where}: {kind} is on port {port}, not the admin port")
    return secrets


# What `shopctl chaos`'s scaled scenarios run (tools/shopctl/src/chaos/stack.rs).
NATS_NODES = 3
STREAM_REPLICAS = "3"
MIN_SERVICE_REPLICAS = 2


def check_prod_topology(path, problems):
    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]
    nats = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "nats"]
    if len(nats) != 1 or nats[0]["spec"].get("replicas") != NATS_NODES:
        found = [d["spec"].get("replicas") for d in nats]
        problems.append(f"{path}: expected one nats StatefulSet of {NATS_NODES} nodes, found {found}")
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for service in SERVICES:
        for kind, name in (("Deployment", service), ("ConfigMap", f"{service}-config")):
            if (kind, name) not in kinds:
                problems.append(f"{path}: no {kind} {name}, so its topology cannot be checked")
    for doc in docs:
        name = doc["metadata"]["name"]
        if doc["kind"] == "ConfigMap" and name in {f"{s}-config" for s in SERVICES}:
            data = doc.get("data", {})
            if data.get("APP_STREAMS__REPLICAS") != STREAM_REPLICAS:
                problems.append(
                    f"{path}: {name} sets APP_STREAMS__REPLICAS={data.get('APP_STREAMS__REPLICAS')}, "
                    f"not {STREAM_REPLICAS}"
                )
            if "APP_CONSUMER_PREFIX" in data:
                problems.append(f"{path}: {name} renames the consumers (APP_CONSUMER_PREFIX)")
        if doc["kind"] == "Deployment" and name in SERVICES:
            if doc["spec"].get("replicas", 1) < MIN_SERVICE_REPLICAS:
                problems.append(
                    f"{path}: {name} runs {doc['spec'].get('replicas', 1)} replica(s), "
                    f"fewer than {MIN_SERVICE_REPLICAS}"
                )


def dockerfile_env(dockerfile):
    """ENV per build stage, following `FROM <stage> AS <name>` inheritance."""
    stages, current, env = {}, None, {}
    lines = open(dockerfile, encoding="utf-8").read().replace("\\\n", " ").splitlines()
    for line in lines:
        words = line.split()
        if not words:
            continue
        if words[0] == "FROM":
            base = words[1]
            current = words[3] if len(words) > 3 and words[2].upper() == "AS" else None
            env = dict(stages.get(base, {}))
            if current:
                stages[current] = env
        elif words[0] == "ENV" and current:
            for pair in words[1:]:
                if "=" in pair:
                    key, value = pair.split("=", 1)
                    env[key] = value
    return stages


def check_compose(path, dockerfile, refs, problems):
    compose = yaml.safe_load(open(path, encoding="utf-8"))
    stages = dockerfile_env(dockerfile)
    for name, spec in compose["services"].items():
        target = (spec.get("build") or {}).get("target")
        if target not in SERVICES:
            continue
        where = f"{path}: {name}"
        env = dict(stages.get(target, {}))
        env.update(spec.get("environment") or {})
        check_env(where, target, env, refs[target], problems)
        test = (spec.get("healthcheck") or {}).get("test", [])
        if "--healthcheck" not in test:
            problems.append(f"{where}: the healthcheck must run `{target} --healthcheck`")
        grpc = port_of(env.get("APP_GRPC_ADDR", refs[target]["APP_GRPC_ADDR"]))
        published = [int(str(p).rsplit(":", 1)[-1]) for p in spec.get("ports", [])]
        if published and grpc not in published:
            problems.append(f"{where}: publishes {published} but serves gRPC on {grpc}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", required=True)
    parser.add_argument("--k8s", nargs="+", required=True)
    parser.add_argument("--prod", required=True, help="the rendered prod overlay")
    parser.add_argument("--compose", required=True)
    parser.add_argument("--dockerfile", required=True)
    parser.add_argument("--readme", required=True)
    parser.add_argument("--admin-src", required=True)
    args = parser.parse_args()
    refs = {service: reference(args.bin, service) for service in SERVICES}
    paths = served_paths(args.admin_src)
    problems = []
    if not {"/livez", "/readyz"} <= paths:
        problems.append(f"{args.admin_src}: expected /livez and /readyz among {sorted(paths)}")
    secrets_by_file = {path: check_k8s(path, refs, paths, problems) for path in args.k8s}
    readme = open(args.readme, encoding="utf-8").read()
    for secret in sorted(secrets_by_file.get(args.prod, set())):
        if f"`{secret}`" not in readme:
            problems.append(f"{args.readme}: the prod overlay needs Secret `{secret}`; name it")
    check_prod_topology(args.prod, problems)
    check_compose(args.compose, args.dockerfile, refs, problems)
    for problem in problems:
        print(problem)
    if problems:
        sys.exit(1)
    print(
        f"config contract: ok ({len(args.k8s)} overlays, compose, "
        f"{sum(len(r) for r in refs.values())} variables known)"
    )


if __name__ == "__main__":
    main()
