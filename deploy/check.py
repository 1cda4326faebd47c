#!/usr/bin/env python3
"""What a schema cannot see in the deployment descriptions: that they describe the same system.

- docker-compose.yml: one adapter container per bank file, on the bank file's port; every socialcard
  service health-checked by `socialcard health`; every dependency, volume and mounted file exists.
- deploy/prometheus/prometheus.yml scrapes every socialcard service; deploy/otel/collector.yaml's
  pipelines use only what it defines and export to a service compose runs.
- deploy/k8s/: every workload has readiness and liveness probes on a port its container exposes, every
  Service selects a workload and targets named ports, every ConfigMap and Secret mounted is created
  (here, or by create-secrets.sh), and kustomization.yaml lists every manifest.
- With the binary (`--bin target/debug/socialcard`): every SOCIALCARD_* variable set for a service is one
  its `socialcard serve <service>` reads, so a renamed flag cannot silently drop a setting.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tomllib

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
errors: list[str] = []


def check(ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def load_all(path: pathlib.Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def banks() -> dict[str, int]:
    out = {}
    for path in sorted((ROOT / "deploy" / "banks").glob("*.toml")):
        bank = tomllib.loads(path.read_text())
        out[bank["code"]] = int(bank["port"])
    return out


def socialcard_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if (s.get("command") or [None])[0] == "serve"}


def check_compose(compose: dict, bank_ports: dict[str, int]) -> None:
    services = compose["services"]
    ours = socialcard_services(compose)
    for code, port in bank_ports.items():
        name = f"bank-adapter-{code}"
        s = ours.get(name)
        check(s is not None, f"compose: no container for bank {code}")
        if s is None:
            continue
        check(s["command"] == ["serve", "bank-adapter"], f"compose: {name} does not serve a bank adapter")
        check(s["environment"].get("SOCIALCARD_BANK") == code, f"compose: {name} serves another bank")
        check(f"{port}:{port}" in s.get("ports", []), f"compose: {name} does not publish its port {port}")
    for want in ["registry", "loss-coordinator", "postal", "ops"]:
        check(want in ours, f"compose: no {want} container")
    for want in ["kafka", "postgres", "otel-collector", "jaeger", "prometheus", "certs"]:
        check(want in services, f"compose: no {want} container")
    kafka_roles = services.get("kafka", {}).get("environment", {}).get("KAFKA_PROCESS_ROLES", "")
    check("controller" in kafka_roles, "compose: kafka is not in KRaft mode (its own controller)")
    declared_volumes = set(compose.get("volumes", {}))
    for name, s in services.items():
        for dep in s.get("depends_on", []):
            check(dep in services, f"compose: {name} depends on unknown {dep}")
        for v in s.get("volumes", []):
            source = v.split(":")[0]
            if source.startswith("./"):
                check((ROOT / source).exists(), f"compose: {name} mounts missing {source}")
            else:
                check(source in declared_volumes, f"compose: {name} uses undeclared volume {source}")
    for name, s in ours.items():
        test = s.get("healthcheck", {}).get("test", [])
        check(test[:2] == ["CMD", "socialcard"] and "health" in test, f"compose: {name} is not health-checked")
        env = s["environment"]
        check(env.get("SOCIALCARD_KAFKA_BROKERS") == "kafka:9092", f"compose: {name} does not use the kafka service")
        check(env.get("OTEL_SERVICE_NAME") == name, f"compose: {name} traces under another name")
        check(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").startswith("http://otel-collector:"),
              f"compose: {name} does not export traces to the collector")
        check(f"{name}-data:/var/lib/socialcard" in s["volumes"], f"compose: {name} has no data volume of its own")
        if "SOCIALCARD_TLS_DIR" in env:
            check("--tls-server" in test, f"compose: {name} serves TLS but its health check speaks plaintext")
            check(any(v.startswith("pki:") and v.endswith(":ro") for v in s["volumes"]),
                  f"compose: {name} serves TLS without the certificates")
            check(s.get("depends_on", {}).get("certs", {}).get("condition") == "service_completed_successfully",
                  f"compose: {name} may start before its certificates exist")
    registry = ours.get("registry", {}).get("environment", {})
    check(registry.get("SOCIALCARD_REGISTRY_DATABASE_URL", "").startswith("postgres://"),
          "compose: the registry is not on PostgreSQL")


def check_prometheus(compose: dict) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    for name in socialcard_services(compose):
        check(f"{name}:9464" in targets, f"prometheus: {name}'s /metrics is not scraped")
    for t in targets:
        check(t.split(":")[0] in compose["services"], f"prometheus: scrapes {t}, which compose does not run")


def check_collector(compose: dict) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "otel" / "collector.yaml").read_text())
    for pipeline, p in config["service"]["pipelines"].items():
        for kind in ["receivers", "processors", "exporters"]:
            for component in p.get(kind, []):
                check(component in config.get(kind, {}), f"collector: {pipeline} uses undefined {kind[:-1]} {component}")
    for ext in config["service"].get("extensions", []):
        check(ext in config.get("extensions", {}), f"collector: undefined extension {ext}")
    for name, exporter in config["exporters"].items():
        host = str(exporter.get("endpoint", "")).split("://")[-1].split(":")[0]
        check(host in compose["services"], f"collector: exporter {name} sends to {host}, which compose does not run")
    check(any("jaeger" in e for e in config["service"]["pipelines"]["traces"]["exporters"]),
          "collector: traces do not reach Jaeger")


def check_k8s(bank_ports: dict[str, int]) -> None:
    k8s = ROOT / "deploy" / "k8s"
    docs: list[dict] = []
    files = sorted(p.name for p in k8s.glob("*.yaml") if p.name != "kustomization.yaml")
    for name in files:
        docs += load_all(k8s / name)
    kustomization = yaml.safe_load((k8s / "kustomization.yaml").read_text())
    check(sorted(kustomization["resources"]) == files, "k8s: kustomization.yaml does not list every manifest")
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    names = {d["metadata"]["name"] for d in workloads}
    for code in bank_ports:
        check(f"bank-adapter-{code}" in names, f"k8s: no workload for bank {code}")
    for want in ["registry", "loss-coordinator", "postal", "ops", "kafka", "otel-collector", "jaeger"]:
        check(want in names, f"k8s: no {want} workload")
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    banks_cm = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "socialcard-banks"), None)
    check(banks_cm is not None and sorted(banks_cm["data"]) == sorted(f"{c}.toml" for c in bank_ports),
          "k8s: the socialcard-banks ConfigMap does not hold every bank file")
    secrets_script = (k8s / "create-secrets.sh").read_text()
    for w in workloads:
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]
        check(pod["metadata"]["labels"].items() >= w["spec"]["selector"]["matchLabels"].items(),
              f"k8s: {name}'s selector does not match its pods")
        for c in pod["spec"]["containers"]:
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            if c["image"].startswith("socialcard"):
                for probe in ["readinessProbe", "livenessProbe"]:
                    check(probe in c, f"k8s: {name} has no {probe}")
                    p = c.get(probe, {})
                    if "grpc" in p:
                        check(p["grpc"]["port"] in ports.values(), f"k8s: {name}'s {probe} probes a port it does not expose")
                    elif "exec" in p:
                        cmd = p["exec"]["command"]
                        check(cmd[:1] == ["socialcard"] and "health" in cmd, f"k8s: {name}'s {probe} is not gRPC health")
                        endpoint = cmd[cmd.index("--endpoint") + 1]
                        check(int(endpoint.rsplit(":", 1)[1]) in ports.values(),
                              f"k8s: {name}'s {probe} probes a port it does not expose")
                    else:
                        check(False, f"k8s: {name}'s {probe} is not gRPC health")
                check("metrics" in ports, f"k8s: {name} exposes no metrics port")
                if name.startswith("bank-adapter-"):
                    code = name.removeprefix("bank-adapter-")
                    check(bank_ports[code] in ports.values(), f"k8s: {name} is not on its bank file's port")
        for v in pod["spec"].get("volumes", []):
            if "configMap" in v:
                check(v["configMap"]["name"] in configmaps, f"k8s: {name} mounts missing ConfigMap {v['configMap']['name']}")
            if "secret" in v:
                secret = v["secret"]["secretName"]
                created = secret.removeprefix("socialcard-tls-")
                # create-secrets.sh creates socialcard-tls-registry, -loss-coordinator and one per bank file.
                check(secret == "socialcard-tls-registry" or created == "loss-coordinator"
                      or (created.startswith("bank-adapter-") and created.removeprefix("bank-adapter-") in bank_ports),
                      f"k8s: {name} mounts Secret {secret}, which create-secrets.sh does not create")
                check("socialcard-tls-" in secrets_script, "k8s: create-secrets.sh creates no TLS secrets")
                if name.startswith("bank-adapter-"):
                    paths = {i["path"] for i in v["secret"]["items"]}
                    check(all(name in p for p in paths if p != "ca.pem"),
                          f"k8s: {name} is given another service's certificates")
    for svc in (d for d in docs if d["kind"] == "Service"):
        name = svc["metadata"]["name"]
        target = next((w for w in workloads
                       if w["spec"]["template"]["metadata"]["labels"].items() >= svc["spec"]["selector"].items()), None)
        check(target is not None, f"k8s: Service {name} selects no workload")
        if target is None:
            continue
        named = {p.get("name") for c in target["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            check(not isinstance(t, str) or t in named, f"k8s: Service {name} targets unknown port {t}")


def check_env_against_binary(binary: str, compose: dict) -> None:
    """Every SOCIALCARD_* variable given to a service is one `socialcard serve <service>` reads."""
    for name, s in socialcard_services(compose).items():
        service = s["command"][1]
        help_text = subprocess.run([binary, "serve", service, "--help"], capture_output=True, text=True, check=True).stdout
        known = set(re.findall(r"env: (SOCIALCARD_[A-Z_]+)", help_text)) | {"SOCIALCARD_TLS_DIR"}
        top = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
        known |= set(re.findall(r"env: (SOCIALCARD_[A-Z_]+)", top))
        for var in s["environment"]:
            if var.startswith("SOCIALCARD_"):
                check(var in known, f"compose: {name} sets {var}, which `socialcard serve {service}` does not read")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bin", help="the socialcard binary, to check the services' variables against it")
    args = parser.parse_args()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    bank_ports = banks()
    check_compose(compose, bank_ports)
    check_prometheus(compose)
    check_collector(compose)
    check_k8s(bank_ports)
    if args.bin:
        check_env_against_binary(args.bin, compose)
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
