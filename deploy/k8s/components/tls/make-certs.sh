#!/usr/bin/env bash
# Makes a throwaway CA plus a rollout and a trainer certificate for the tls component, with openssl.
#   deploy/k8s/components/tls/make-certs.sh [OUT_DIR] [NAMESPACE] [MAX_ROLLOUTS]
# Writes OUT_DIR/{ca,rollout,trainer}.{crt,key}; creates nothing in the cluster (docs/kubernetes.md shows the
# `kubectl create secret` lines). For production, issue these from your own CA (e.g. cert-manager)
# with the same names: the rollout certificate must name every address the trainer dials.
set -euo pipefail

out=${1:-weightsync-tls}
namespace=${2:-weightsync}
max_rollouts=${3:-8}
days=${DAYS:-365}
service=weightsync-rollout

mkdir -p "$out"
cd "$out"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=weightsync-ca" -out ca.crt

# The trainer dials weightsync-rollout-N.weightsync-rollout (gRPC does not match a wildcard whose parent
# is one label), so each pod's short name is listed; longer forms are covered by wildcards. localhost and
# 127.0.0.1 are for the exec probe inside the pod, which also presents this certificate as a client.
sans="DNS:localhost,IP:127.0.0.1"
for ((i = 0; i < max_rollouts; i++)); do
    sans+=",DNS:$service-$i.$service"
done
for suffix in "$namespace.svc" "$namespace.svc.cluster.local"; do
    sans+=",DNS:*.$service.$suffix,DNS:$service.$suffix,DNS:weightsync-generate.$suffix"
done
sans+=",DNS:$service,DNS:weightsync-generate"

issue() {  # name, subjectAltName or "", extendedKeyUsage
    local name=$1 san=$2 eku=$3 ext
    key "$name.key"
    ext="basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$eku"
    [[ -n $san ]] && ext+=$'\n'"subjectAltName=$san"
    openssl req -new -key "$name.key" -subj "/CN=weightsync-$name" -out "$name.csr"
    openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
        -extfile <(printf '%s\n' "$ext") -out "$name.crt" 2>/dev/null
    rm -f "$name.csr"
}

issue rollout "$sans" serverAuth,clientAuth
issue trainer "" clientAuth
rm -f ca.srl
chmod 600 ./*.key
echo "wrote $out/{ca,rollout,trainer}.{crt,key} for namespace $namespace, rollouts 0..$((max_rollouts - 1))"
