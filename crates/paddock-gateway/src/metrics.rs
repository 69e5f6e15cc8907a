//! Prometheus metrics (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Label set with a state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// Task state.
    pub state: String,
}

/// Label set with an error code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// Error code.
    pub code: String,
}

/// All gateway metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Tasks by state (refreshed at scrape time from the database).
    pub tasks: Family<StateLabel, Gauge>,
    /// Queued tasks (all orgs).
    pub queue_depth: Gauge,
    /// Agents connected to this replica.
    pub connected_agents: Gauge,
    /// Seconds from submission to dispatch.
    pub dispatch_latency: Histogram,
    /// Tasks dispatched by this replica.
    pub dispatched: Counter,
    /// Results stored by this replica, by final state.
    pub completed: Family<StateLabel, Counter>,
    /// Results ignored (stale attempt or duplicate).
    pub stale_results: Counter,
    /// Frames refused, by code.
    pub rejected_frames: Family<CodeLabel, Counter>,
    /// Instances by status (refreshed at scrape time).
    pub instances: Family<StateLabel, Gauge>,
    /// Desired instances per pool (`min(max, busy + queued + min)`, at least min).
    pub pool_desired: Family<PoolLabel, Gauge>,
    /// Live (not terminated) instances per pool.
    pub pool_actual: Family<PoolLabel, Gauge>,
    /// Seconds from an instance's creation (the demand) to its runtime's first connection.
    pub instance_ready_latency: Histogram,
    /// Failed bootstrap attempts seen by this replica.
    pub bootstrap_failures: Counter,
}

/// Label of per-pool metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    /// Org id.
    pub org: String,
    /// Pool name.
    pub pool: String,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("paddock");
        let tasks = Family::<StateLabel, Gauge>::default();
        let queue_depth = Gauge::default();
        let connected_agents = Gauge::default();
        let dispatch_latency = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0,
        ]);
        let dispatched = Counter::default();
        let completed = Family::<StateLabel, Counter>::default();
        let stale_results = Counter::default();
        let rejected_frames = Family::<CodeLabel, Counter>::default();
        let instances = Family::<StateLabel, Gauge>::default();
        let pool_desired = Family::<PoolLabel, Gauge>::default();
        let pool_actual = Family::<PoolLabel, Gauge>::default();
        let instance_ready_latency = Histogram::new([
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ]);
        let bootstrap_failures = Counter::default();
        registry.register("instances", "Instances by status", instances.clone());
        registry.register(
            "pool_desired_instances",
            "Desired instances per pool",
            pool_desired.clone(),
        );
        registry.register(
            "pool_actual_instances",
            "Live instances per pool",
            pool_actual.clone(),
        );
        registry.register(
            "instance_ready_seconds",
            "Time from an instance's creation to its runtime's first connection",
            instance_ready_latency.clone(),
        );
        registry.register(
            "bootstrap_failures",
            "Failed instance bootstrap attempts",
            bootstrap_failures.clone(),
        );
        registry.register("tasks", "Tasks by state", tasks.clone());
        registry.register(
            "queue_depth",
            "Queued tasks waiting for an agent",
            queue_depth.clone(),
        );
        registry.register(
            "connected_agents",
            "Agents connected to this replica",
            connected_agents.clone(),
        );
        registry.register(
            "dispatch_latency_seconds",
            "Time from task submission to dispatch",
            dispatch_latency.clone(),
        );
        registry.register(
            "dispatched",
            "Task attempts dispatched by this replica",
            dispatched.clone(),
        );
        registry.register(
            "results",
            "Results stored by this replica, by final state",
            completed.clone(),
        );
        registry.register(
            "stale_results",
            "Results ignored because their attempt was not current",
            stale_results.clone(),
        );
        registry.register(
            "rejected_frames",
            "WebSocket frames refused, by code",
            rejected_frames.clone(),
        );
        Metrics {
            registry,
            tasks,
            queue_depth,
            connected_agents,
            dispatch_latency,
            dispatched,
            completed,
            stale_results,
            rejected_frames,
            instances,
            pool_desired,
            pool_actual,
            instance_ready_latency,
            bootstrap_failures,
        }
    }
}

impl Metrics {
    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
