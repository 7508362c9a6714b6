// bitfold matrix-vector-activation unit (Verilog-2005; yosys, verilator and iverilog).
//
// One convolution (K x K window, STRIDE, PAD with the code PADCODE) or one dense layer
// (IH = IW = K = 1), folded as PE output channels x SIMD input elements per cycle, followed by a
// multi-threshold activation (NT sorted thresholds per channel: out = #{k : acc >= T[k]}, found by
// binary search) or, when
// NT = 0, the raw signed accumulator.
//
// Streams: valid/ready, one element per beat, pixel-major (H, W, C) order; inputs are unsigned
// IBITS-bit codes, weights signed WBITS-bit integers.
// Schedule per frame: LOAD the whole input map into a buffer (IH*IW*IC beats), then for every
// output pixel and every group of PE channels read SF = K*K*IC/SIMD buffer/weight words (one per
// cycle, 3-stage pipeline), threshold and EMIT the PE results. Weights and thresholds are ROMs
// initialised from WFILE / TFILE ($readmemh), so yosys can map them to block RAM.
module bf_mvau #(
  parameter IH = 1, IW = 1, IC = 4, OC = 4, K = 1, STRIDE = 1, PAD = 0, OH = 1, OW = 1,
  parameter SIMD = 1, PE = 1,
  parameter IBITS = 2, WBITS = 2, ACCB = 16, OBITS = 2, NT = 3,
  parameter PADCODE = 0,
  parameter WFILE = "w.mem", TFILE = "t.mem"
) (
  input  wire clk,
  input  wire rst,
  input  wire in_valid,
  output wire in_ready,
  input  wire [IBITS-1:0] in_data,
  output wire out_valid,
  input  wire out_ready,
  output wire [OBITS-1:0] out_data
);
  localparam CG = IC / SIMD;       // channel groups per pixel
  localparam SF = K * K * CG;      // weight words per output channel group
  localparam NF = OC / PE;         // output channel groups
  localparam IWORDS = IH * IW * CG;
  localparam TW = (NT > 0) ? NT : 1;
  // counter widths (one spare bit so comparisons with the bound never wrap)
  localparam CW = $clog2(IWORDS + NF * SF + IH + IW + OC + K + 2) + 1;
  localparam [IBITS-1:0] PADC = PADCODE;
  localparam S_LOAD = 2'd0, S_COMP = 2'd1, S_WAIT = 2'd2, S_EMIT = 2'd3;

  reg [SIMD*IBITS-1:0] ibuf [0:IWORDS-1];
  reg [PE*SIMD*WBITS-1:0] wrom [0:NF*SF-1];
  reg [PE*TW*ACCB-1:0] trom [0:NF-1];
  initial $readmemh(WFILE, wrom);
  initial $readmemh(TFILE, trom);

  reg [1:0] state;

  // ---------------------------------------------------------------- load
  reg [(SIMD+1)*IBITS-1:0] sh;
  wire [(SIMD+1)*IBITS-1:0] shn = {in_data, sh[(SIMD+1)*IBITS-1:IBITS]};
  reg [CW-1:0] lane, waddr;
  assign in_ready = (state == S_LOAD);

  // ---------------------------------------------------------------- compute counters
  reg [CW-1:0] oy, ox, nf, ky, kx, cg, sf, wbase;
  wire signed [CW+1:0] iy = $signed({2'b00, oy}) * STRIDE + $signed({2'b00, ky}) - PAD;
  wire signed [CW+1:0] ix = $signed({2'b00, ox}) * STRIDE + $signed({2'b00, kx}) - PAD;
  wire padnow = (iy < 0) || (iy >= IH) || (ix < 0) || (ix >= IW);
  wire [CW+1:0] raddr = padnow ? {(CW+2){1'b0}} : ((iy * IW + ix) * CG + cg);
  wire issue = (state == S_COMP);
  wire last_sf = (sf == SF - 1);

  // stage A: memory reads
  reg [SIMD*IBITS-1:0] rdA;
  reg [PE*SIMD*WBITS-1:0] wdA;
  reg vA, firstA, lastA, padA;
  reg [PE*TW*ACCB-1:0] thr;
  // stage B: dot products
  reg [PE*ACCB-1:0] dotB;
  reg vB, firstB, lastB;
  // stage C: accumulators
  reg [PE*ACCB-1:0] acc;
  reg doneC;
  // results
  reg [(PE+1)*OBITS-1:0] obuf;
  reg [CW-1:0] ecnt;

  integer p, s, k, q, r;
  reg signed [ACCB-1:0] sum;
  reg signed [WBITS-1:0] wv;
  reg [IBITS-1:0] xv;
  reg signed [WBITS+IBITS:0] prod;   // product at its natural width, then sign-extended
  reg [PE*ACCB-1:0] dotc;
  always @* begin
    dotc = {PE*ACCB{1'b0}};
    for (p = 0; p < PE; p = p + 1) begin
      sum = {ACCB{1'b0}};
      for (s = 0; s < SIMD; s = s + 1) begin
        wv = wdA[(p*SIMD+s)*WBITS +: WBITS];
        xv = padA ? PADC : rdA[s*IBITS +: IBITS];
        prod = wv * $signed({1'b0, xv});
        sum = sum + prod;
      end
      dotc[p*ACCB +: ACCB] = sum;
    end
  end

  // multi-threshold activation as a binary search over the sorted thresholds: OBITS comparisons
  // per channel instead of NT (and no NT-long chain of adders, which made deep logic for 8 bits)
  reg [PE*OBITS-1:0] actc;
  reg [OBITS:0] idx, cand;
  integer b;
  always @* begin
    actc = {PE*OBITS{1'b0}};
    for (r = 0; r < PE; r = r + 1) begin
      if (NT == 0) begin
        actc[r*OBITS +: OBITS] = acc[r*ACCB +: OBITS];
      end else begin
        idx = {(OBITS+1){1'b0}};
        for (b = OBITS - 1; b >= 0; b = b - 1) begin
          cand = idx | ({{OBITS{1'b0}}, 1'b1} << b);
          if (cand <= NT)
            if ($signed(acc[r*ACCB +: ACCB]) >= $signed(thr[(r*TW + cand - 1)*ACCB +: ACCB]))
              idx = cand;
        end
        actc[r*OBITS +: OBITS] = idx[OBITS-1:0];
      end
    end
  end

  assign out_valid = (state == S_EMIT);
  assign out_data = obuf[OBITS-1:0];

  always @(posedge clk) begin
    // pipeline (runs every cycle)
    rdA <= ibuf[raddr];
    wdA <= wrom[wbase + sf];
    thr <= trom[nf];
    vA <= issue;
    padA <= padnow;
    firstA <= (sf == 0);
    lastA <= last_sf;
    dotB <= dotc;
    vB <= vA;
    firstB <= firstA;
    lastB <= lastA;
    if (vB)
      for (q = 0; q < PE; q = q + 1)
        acc[q*ACCB +: ACCB] <= firstB ? dotB[q*ACCB +: ACCB] : acc[q*ACCB +: ACCB] + dotB[q*ACCB +: ACCB];
    doneC <= vB && lastB;

    if (rst) begin
      state <= S_LOAD;
      lane <= 0; waddr <= 0;
      oy <= 0; ox <= 0; nf <= 0; ky <= 0; kx <= 0; cg <= 0; sf <= 0; wbase <= 0;
      vA <= 1'b0; vB <= 1'b0; doneC <= 1'b0; ecnt <= 0;
    end else begin
      case (state)
        S_LOAD: if (in_valid) begin
          sh <= shn;
          if (lane == SIMD - 1) begin
            ibuf[waddr] <= shn[(SIMD+1)*IBITS-1:IBITS];
            lane <= 0;
            if (waddr == IWORDS - 1) begin
              waddr <= 0;
              state <= S_COMP;
            end else
              waddr <= waddr + 1;
          end else
            lane <= lane + 1;
        end
        S_COMP: begin
          if (last_sf) begin
            sf <= 0; cg <= 0; kx <= 0; ky <= 0;
            state <= S_WAIT;
          end else begin
            sf <= sf + 1;
            if (cg == CG - 1) begin
              cg <= 0;
              if (kx == K - 1) begin kx <= 0; ky <= ky + 1; end
              else kx <= kx + 1;
            end else
              cg <= cg + 1;
          end
        end
        S_WAIT: if (doneC) begin
          obuf <= {{OBITS{1'b0}}, actc};
          ecnt <= 0;
          state <= S_EMIT;
        end
        S_EMIT: if (out_ready) begin
          obuf <= obuf >> OBITS;
          if (ecnt == PE - 1) begin
            ecnt <= 0;
            if (nf == NF - 1) begin
              nf <= 0; wbase <= 0;
              if (ox == OW - 1) begin
                ox <= 0;
                if (oy == OH - 1) begin oy <= 0; state <= S_LOAD; end
                else begin oy <= oy + 1; state <= S_COMP; end
              end else begin
                ox <= ox + 1; state <= S_COMP;
              end
            end else begin
              nf <= nf + 1; wbase <= wbase + SF; state <= S_COMP;
            end
          end else
            ecnt <= ecnt + 1;
        end
      endcase
    end
  end
endmodule
