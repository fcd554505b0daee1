"""JSON schemas of the custom resources the chart renders, for the fields it may use.

kubernetes-validate bundles only built-in kinds, so KEDA's ScaledObject and the Prometheus Operator's
ServiceMonitor are checked here. Written from the projects' documented fields (KEDA 2.x ScaledObject
and its prometheus, redis-streams, redis-sentinel-streams and redis-cluster-streams triggers;
monitoring.coreos.com/v1 ServiceMonitor), every object closed (``additionalProperties: false``):
KEDA ignores an unknown trigger parameter, so a misspelt ``pendingEntriesCount`` would otherwise
deploy a scaler that never scales.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INT: Schema = {"type": "integer", "minimum": 0}
BOOL_STRING: Schema = {"type": "string", "enum": ["true", "false"]}
NUMBER_STRING: Schema = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}
STRING_MAP: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
# A DNS subdomain, as Kubernetes requires of object names.
NAME: Schema = {"type": "string", "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
# Prometheus Operator's Duration type.
DURATION: Schema = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}


def closed(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


OBJECT_META = closed(
    {"name": NAME, "namespace": NAME, "labels": STRING_MAP, "annotations": STRING_MAP}, ("name",)
)


def resource(api_version: str, kind: str, spec: Schema) -> Schema:
    return closed(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": OBJECT_META,
            "spec": spec,
        },
        ("apiVersion", "kind", "metadata", "spec"),
    )


# ------------------------------------------------------------------------------------------ KEDA

_STREAM_COMMON = {
    "usernameFromEnv": STRING,
    "passwordFromEnv": STRING,
    "stream": {"type": "string", "minLength": 1},
    "consumerGroup": STRING,
    "pendingEntriesCount": NUMBER_STRING,
    "streamLength": NUMBER_STRING,
    "lagCount": NUMBER_STRING,
    "activationLagCount": NUMBER_STRING,
    "enableTLS": BOOL_STRING,
    "unsafeSsl": BOOL_STRING,
    "databaseIndex": NUMBER_STRING,
}
_MULTI_ADDRESS = {
    "addresses": STRING,
    "hosts": STRING,
    "ports": STRING,
    "addressesFromEnv": STRING,
    "hostsFromEnv": STRING,
    "portsFromEnv": STRING,
}


def _stream_metadata(connection: dict[str, Schema]) -> Schema:
    schema = closed({**connection, **_STREAM_COMMON}, ("stream",))
    # The scaler's documented modes: pending entries and lag are counted for a consumer group; with
    # no group it falls back to the stream's length (a group given with streamLength would switch it
    # to pending entries).
    schema["dependencies"] = {"pendingEntriesCount": ["consumerGroup"], "lagCount": ["consumerGroup"]}
    schema["if"] = {"required": ["streamLength"]}
    schema["then"] = {"not": {"required": ["consumerGroup"]}}
    return schema


TRIGGER_METADATA: dict[str, Schema] = {
    "prometheus": closed(
        {
            "serverAddress": {"type": "string", "pattern": "^https?://"},
            "query": {"type": "string", "minLength": 1},
            "threshold": NUMBER_STRING,
            "activationThreshold": NUMBER_STRING,
            "namespace": STRING,
            "customHeaders": STRING,
            "ignoreNullValues": BOOL_STRING,
            "queryParameters": STRING,
            "unsafeSsl": BOOL_STRING,
            "authModes": STRING,
        },
        ("serverAddress", "query", "threshold"),
    ),
    "redis-streams": _stream_metadata(
        {
            "address": {"type": "string", "pattern": r"^[^\s:,]+:[0-9]+$"},
            "host": STRING,
            "port": STRING,
            "addressFromEnv": STRING,
            "hostFromEnv": STRING,
            "portFromEnv": STRING,
        }
    ),
    "redis-sentinel-streams": _stream_metadata(
        {
            **_MULTI_ADDRESS,
            "sentinelUsernameFromEnv": STRING,
            "sentinelPasswordFromEnv": STRING,
            "sentinelMaster": STRING,
            "sentinelMasterFromEnv": STRING,
        }
    ),
    "redis-cluster-streams": _stream_metadata(_MULTI_ADDRESS),
}

TRIGGER: Schema = {
    **closed(
        {
            "type": {"enum": sorted(TRIGGER_METADATA)},
            "name": STRING,
            "metadata": {"type": "object"},
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "useCachedMetrics": {"type": "boolean"},
            "authenticationRef": closed({"name": STRING, "kind": STRING}, ("name",)),
        },
        ("type", "metadata"),
    ),
    "allOf": [
        {"if": {"properties": {"type": {"const": kind}}}, "then": {"properties": {"metadata": schema}}}
        for kind, schema in TRIGGER_METADATA.items()
    ],
}

SCALED_OBJECT = resource(
    "keda.sh/v1alpha1",
    "ScaledObject",
    closed(
        {
            "scaleTargetRef": closed(
                {"apiVersion": STRING, "kind": STRING, "name": NAME, "envSourceContainerName": STRING},
                ("name",),
            ),
            "pollingInterval": INT,
            "cooldownPeriod": INT,
            "initialCooldownPeriod": INT,
            "idleReplicaCount": INT,
            "minReplicaCount": INT,
            "maxReplicaCount": {"type": "integer", "minimum": 1},
            "fallback": closed({"failureThreshold": INT, "replicas": INT}, ("failureThreshold", "replicas")),
            "advanced": closed(
                {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    # behavior itself is a Kubernetes HorizontalPodAutoscalerBehavior: the test
                    # validates it with kubernetes-validate's schema.
                    "horizontalPodAutoscalerConfig": closed({"name": STRING, "behavior": {"type": "object"}}),
                }
            ),
            "triggers": {"type": "array", "minItems": 1, "items": TRIGGER},
        },
        ("scaleTargetRef", "triggers"),
    ),
)

# ----------------------------------------------------------------------------------- Prometheus Operator

RELABEL_CONFIG = closed(
    {
        "sourceLabels": {"type": "array", "items": STRING},
        "separator": STRING,
        "targetLabel": STRING,
        "regex": STRING,
        "modulus": INT,
        "replacement": STRING,
        "action": {
            "enum": [
                "replace",
                "keep",
                "drop",
                "hashmod",
                "labelmap",
                "labeldrop",
                "labelkeep",
                "lowercase",
                "uppercase",
                "keepequal",
                "dropequal",
            ]
        },
    }
)

SERVICE_MONITOR = resource(
    "monitoring.coreos.com/v1",
    "ServiceMonitor",
    closed(
        {
            "selector": closed({"matchLabels": STRING_MAP, "matchExpressions": {"type": "array"}}),
            "namespaceSelector": closed(
                {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": STRING}}
            ),
            "jobLabel": STRING,
            "targetLabels": {"type": "array", "items": STRING},
            "podTargetLabels": {"type": "array", "items": STRING},
            "sampleLimit": INT,
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": closed(
                    {
                        "port": STRING,
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "honorLabels": {"type": "boolean"},
                        "relabelings": {"type": "array", "items": RELABEL_CONFIG},
                        "metricRelabelings": {"type": "array", "items": RELABEL_CONFIG},
                    }
                ),
            },
        },
        ("selector", "endpoints"),
    ),
)

# (apiVersion, kind) -> schema
CRD_SCHEMAS: dict[tuple[str, str], Schema] = {
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
}
