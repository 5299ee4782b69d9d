using BenchmarkDotNet.Running;

// Kernel micro-benchmarks. Run: dotnet run -c Release --project bench/MiniLlm.Bench -- --filter '*'
BenchmarkSwitcher.FromAssembly(typeof(MiniLlm.Bench.MatMulBench).Assembly).Run(args);
