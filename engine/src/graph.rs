//! The step graph (petgraph): edges from the steps an input names to the step that takes it.
//! Cycles are errors pointing at a reference in the cycle; order is topological, ties broken by
//! the order steps are written in.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use petgraph::Direction;
use petgraph::algo::kosaraju_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::Dfs;

use crate::diag::Diagnostic;
use crate::recipe::{Recipe, Ref};

/// Steps and their dependencies; node `i` is step `i` of the recipe.
pub struct StepGraph {
    graph: DiGraph<usize, ()>,
    /// Topological order of step indices.
    pub order: Vec<usize>,
}

impl StepGraph {
    pub fn build(recipe: &Recipe) -> Result<StepGraph, Diagnostic> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..recipe.steps.len()).map(|i| graph.add_node(i)).collect();
        for (i, step) in recipe.steps.iter().enumerate() {
            for input in &step.inputs {
                if let Ref::Step(j) = input.target {
                    graph.update_edge(nodes[j], nodes[i], ());
                }
            }
        }
        // Kahn's algorithm with a min-heap: stable, file-ordered among independent steps.
        let mut indegree: Vec<usize> = nodes
            .iter()
            .map(|&n| graph.neighbors_directed(n, Direction::Incoming).count())
            .collect();
        let mut ready: BinaryHeap<Reverse<usize>> = (0..nodes.len())
            .filter(|&i| indegree[i] == 0)
            .map(Reverse)
            .collect();
        let mut order = Vec::with_capacity(nodes.len());
        while let Some(Reverse(i)) = ready.pop() {
            order.push(i);
            for next in graph.neighbors_directed(nodes[i], Direction::Outgoing) {
                let j = graph[next];
                indegree[j] -= 1;
                if indegree[j] == 0 {
                    ready.push(Reverse(j));
                }
            }
        }
        if order.len() < nodes.len() {
            let cycle = kosaraju_scc(&graph)
                .into_iter()
                .find(|c| c.len() > 1)
                .map(|c| {
                    let mut idx: Vec<usize> = c.iter().map(|&n| graph[n]).collect();
                    idx.sort();
                    idx
                })
                .unwrap_or_default();
            let members: BTreeSet<usize> = cycle.iter().copied().collect();
            let first = cycle.first().copied().unwrap_or(0);
            let step = &recipe.steps[first];
            let input = step
                .inputs
                .iter()
                .find(|inp| matches!(inp.target, Ref::Step(j) if members.contains(&j)))
                .expect("a step in a cycle takes an input from the cycle");
            let names: Vec<String> = cycle
                .iter()
                .map(|&i| format!("`{}`", recipe.steps[i].name))
                .collect();
            return Err(Diagnostic::at(&input.span, format!("steps {} depend on each other in a cycle", names.join(", ")))
                .help("a step can only take inputs from steps that do not, directly or not, take its output"));
        }
        Ok(StepGraph { graph, order })
    }

    fn reach(&self, from: usize, dir: Direction) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let g = petgraph::visit::Reversed(&self.graph);
        match dir {
            Direction::Outgoing => {
                let mut dfs = Dfs::new(&self.graph, NodeIndex::new(from));
                while let Some(n) = dfs.next(&self.graph) {
                    seen.insert(self.graph[n]);
                }
            }
            Direction::Incoming => {
                let mut dfs = Dfs::new(g, NodeIndex::new(from));
                while let Some(n) = dfs.next(g) {
                    seen.insert(self.graph[n]);
                }
            }
        }
        seen.remove(&from);
        seen
    }

    /// Steps that (transitively) consume the output of `step`.
    pub fn descendants(&self, step: usize) -> BTreeSet<usize> {
        self.reach(step, Direction::Outgoing)
    }

    /// Steps whose outputs `step` (transitively) needs.
    pub fn ancestors(&self, step: usize) -> BTreeSet<usize> {
        self.reach(step, Direction::Incoming)
    }
}

/// Graphviz rendering: sources as ellipses, steps as boxes labelled with their op.
pub fn to_dot(recipe: &Recipe) -> String {
    let mut out = format!(
        "digraph \"{}\" {{\n  rankdir=LR;\n",
        recipe.name.replace('"', "'")
    );
    for s in &recipe.sources {
        out.push_str(&format!(
            "  \"sources.{0}\" [shape=ellipse, label=\"{0}\\n({1})\"];\n",
            s.name, s.kind
        ));
    }
    for s in &recipe.steps {
        out.push_str(&format!(
            "  \"steps.{0}\" [shape=box, label=\"{0}\\n{1}\"];\n",
            s.name, s.op
        ));
    }
    for s in &recipe.steps {
        for i in &s.inputs {
            out.push_str(&format!(
                "  \"{}\" -> \"steps.{}\" [label=\"{}\"];\n",
                recipe.ref_name(i.target),
                s.name,
                i.port
            ));
        }
    }
    out.push_str("}\n");
    out
}

/// Mermaid rendering, for Markdown.
pub fn to_mermaid(recipe: &Recipe) -> String {
    let id = |r: &str| r.replace(['.', '-'], "_");
    let mut out = String::from("flowchart LR\n");
    for s in &recipe.sources {
        out.push_str(&format!(
            "  {}([\"{} ({})\"])\n",
            id(&format!("sources.{}", s.name)),
            s.name,
            s.kind
        ));
    }
    for s in &recipe.steps {
        out.push_str(&format!(
            "  {}[\"{}: {}\"]\n",
            id(&format!("steps.{}", s.name)),
            s.name,
            s.op
        ));
    }
    for s in &recipe.steps {
        for i in &s.inputs {
            out.push_str(&format!(
                "  {} -->|{}| {}\n",
                id(&recipe.ref_name(i.target)),
                i.port,
                id(&format!("steps.{}", s.name))
            ));
        }
    }
    out
}
